"""System calls per probe, counted by strace: the kernel's side of a probe's cost.

The probing process (bench/probe_instructions.py's child: N probes of one kind, IN_FLIGHT at a
time, on uvloop) runs under `strace -f -c` once with FEW and once with MANY probes: the
difference over MANY - FEW is one probe's system calls, call by call, start-up and imports
left out. Kinds as in bench/probe_instructions.py (tunnelwatch's real `measure`, and the raw
asyncio + uvloop TLS client of bench/probe_rate.py, its floor).

Usage: .venv/bin/python bench/probe_syscalls.py [--kinds "https IP literal" ...]
        [--few 200] [--many 1200] [--in-flight 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import probe_instructions, probe_rate  # noqa: E402
from bench.daemon_load import dnsmasq  # noqa: E402
from tests.servers import LOOPBACK, free_port, running  # noqa: E402

NAME = probe_instructions.NAME
RESOLVER = probe_instructions.RESOLVER
KINDS = ("http IP literal", "https IP literal", "raw https IP literal", "https name")
ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def _calls(kind: str, url: str, ca: Path, probes: int, in_flight: int, out: Path) -> dict[str, int]:
    child = [sys.executable, probe_instructions.__file__, "--child", kind, "--url", url, "--ca", str(ca)]
    child += ["--probes", str(probes), "--in-flight", str(in_flight)]
    result = subprocess.run(["strace", "-f", "-c", "-o", str(out), *child], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind}: {result.stderr[-2000:]}")
    calls = {}
    for line in out.read_text().splitlines():
        if (match := ROW.match(line)) and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls


def measure(kinds: list[str], few: int, many: int, in_flight: int) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="tw-sys-"))
    web, tls = free_port(), free_port()
    probe_rate.site_files(tmp, web, tls)
    urls = {
        "http IP literal": f"http://{LOOPBACK}:{web}/",
        "https IP literal": f"https://{LOOPBACK}:{tls}/",
        "raw https IP literal": f"https://{LOOPBACK}:{tls}/",
        "https name": f"https://{NAME}:{tls}/",
    }
    nginx = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
    per_probe = {}
    with (
        dnsmasq(tmp, RESOLVER, 53, f"--address=/{NAME}/{LOOPBACK}", f"--local=/{NAME}/"),
        running(nginx, tmp / "nginx.out", web),
    ):
        for kind in kinds:
            low = _calls(kind, urls[kind], tmp / "ca.pem", few, in_flight, tmp / "few.txt")
            high = _calls(kind, urls[kind], tmp / "ca.pem", many, in_flight, tmp / "many.txt")
            per_probe[kind] = {
                call: (high.get(call, 0) - low.get(call, 0)) / (many - few) for call in sorted(high.keys() | low.keys())
            }
    shutil.rmtree(tmp, ignore_errors=True)
    return per_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS[:3]))
    parser.add_argument("--few", type=int, default=200)
    parser.add_argument("--many", type=int, default=1200)
    parser.add_argument("--in-flight", type=int, default=10)
    args = parser.parse_args()
    per_probe = measure(args.kinds, args.few, args.many, args.in_flight)
    calls = sorted({c for counts in per_probe.values() for c in counts if abs(counts[c]) >= 0.05})
    print("| system call | " + " | ".join(per_probe) + " |")
    print("|---|" + "---|" * len(per_probe))
    for call in calls:
        print(f"| {call} | " + " | ".join(f"{counts.get(call, 0):.2f}" for counts in per_probe.values()) + " |")
    print("| total | " + " | ".join(f"{sum(counts.values()):.2f}" for counts in per_probe.values()) + " |")


if __name__ == "__main__":
    main()
