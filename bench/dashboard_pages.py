"""How long each dashboard page takes over a store: made from nothing (cold) and kept.

Through the application itself (Starlette's TestClient, no network, no warming at start):
Now, History, Outages, Events and Reports with their defaults, then History and Outages over
[--since, --until) (a year of the synthetic store by default).

Usage: .venv/bin/python bench/dashboard_pages.py CONFIG [--since 2018-03-01] [--until 2019-03-01]
(CONFIG's store.path, e.g. the synthetic year of bench/synth.py STORE.db --days 365 --compact)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.web.app import build_app  # noqa: E402
from probe.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--since", default="2018-03-01")
    parser.add_argument("--until", default="2019-03-01")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette.testclient over httpx: deprecated, still working
        from starlette.testclient import TestClient
    span = f"since={args.since}&until={args.until}"
    pages = ["/", "/history", "/outages", "/events", "/reports", f"/history?{span}", f"/outages?{span}"]
    load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average before: {load}\n\n| page | cold | kept | size |\n|---|---|---|---|")
    with TestClient(build_app(load_config(args.config), warm=False)) as client:
        for url in pages:
            times = []
            for _ in range(2):
                began = time.perf_counter()
                answer = client.get(url)
                times.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    raise SystemExit(f"{url}: {answer.status_code} {answer.text[:300]}")
            print(f"| `{url}` | {times[0]:.2f} s | {times[1] * 1000:.0f} ms | {len(answer.content) / 1024:.0f} KiB |")


if __name__ == "__main__":
    main()
