"""What the analysis makes of partial blocking over many rounds (the numbers behind the
README's sentence; tests/lab/test_tricks.py checks the same behaviour over a minute):

    TW_LAB_PREFIX=tx- .venv/bin/python -m tests.lab.partial_blocking MINUTES

builds the lab, runs the daemon in the vantage point every 2 s (probe timeout 1.5 s) for
MINUTES with half the SYNs to news.test dropped at random, then again with half the
connections reset, and prints per run: the rounds of (news, direct) as a line (x failed,
s connected on the resent SYN, . fine), how many failed, and the outages `tunnelwatch
outages` gives (count, rounds each, failing rounds inside them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from analysis.frames import load_measurements, load_paths
from analysis.verdicts import classify
from tests.lab.kit import RESET, built, isp_resolver, rule, spawn
from tests.lab.network import VP
from tests.lab.test_tricks import PARTIAL, without_wireguard
from tests.servers import stop

RUNS = {"half the SYNs dropped": ["-j", "DROP"], "half the connections reset": RESET}


def report(config: Path, db: Path, name: str) -> None:
    verdicts = classify(load_measurements(db), load_paths(db), slot_s=2)
    news = verdicts[(verdicts["target"] == "news") & (verdicts["path"] == "direct")].sort_values("started_at")
    failing = (news["verdict"] != "ok").tolist()
    line = "".join("x" if f else ("s" if c > 900 else ".") for f, c in zip(failing, news["connect_ms"], strict=True))
    result = subprocess.run(
        [sys.executable, "-m", "probe", "outages", "--by", "target", "--format", "json", "--config", str(config)]
        + ["--target", "news", "--path", "direct"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = [json.loads(line) for line in result.stdout.splitlines()]
    times = news["started_at"]
    spans = [(times >= pd.Timestamp(o["start"])) & (times < pd.Timestamp(o["end"])) for o in found]
    lengths = [int(span.sum()) for span in spans]
    inside = sum(int((news.loc[span, "verdict"] != "ok").sum()) for span in spans)
    print(f"{name}: {len(failing)} rounds, {sum(failing)} failed, {line.count('s')} slow\n{line}")
    print(f"  {len(found)} outages of {lengths} rounds; {inside} of the {sum(failing)} failing rounds inside them")


def main(minutes: float) -> None:
    with tempfile.TemporaryDirectory() as scratch, built(Path(scratch)) as lab:
        for index, (name, action) in enumerate(RUNS.items()):
            config, db = lab.with_name(f"partial-{index}.toml"), lab.with_name(f"partial-{index}.db")
            text = without_wireguard(lab.read_text()).replace(str(lab.with_name("store.db")), str(db))
            text = text.replace("timeout_s = 3\n", "timeout_s = 1.5\n").replace("[probe]", "[probe]\ninterval_s = 2")
            config.write_text(text)
            with isp_resolver(lab.parent):
                proc = spawn(
                    VP, [sys.executable, "-m", "probe", "run", "--config", str(config)], db.with_suffix(".log")
                )
                try:
                    time.sleep(6)  # the first rounds, clean
                    with rule(*PARTIAL, "--probability", "0.5", *action):
                        time.sleep(minutes * 60)
                finally:
                    stop(proc)
            report(config, db, name)


if __name__ == "__main__":
    main(float(sys.argv[1]))
