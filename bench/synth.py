"""A synthetic store for benchmarks: TARGETS targets x 4 paths at 5-minute rounds for DAYS days.

What is in it: a third of the targets are "blocked" and always fail directly (a TLS reset);
the "vpn" tunnel is down for three days from every NPC opening (5 March) in the range; the
daemon is stopped for 6 hours on the 15th of every month; 0.5 % of probes fail at random;
connect times are log-normal per path. Rows are filled as the daemon fills them for an https
page (final URL, body hash, title, TLS version and certificate) and go in with executemany.
With --compact, the store is compacted after every batch, as the daemon does every hour
(analysis/compaction.py): raw rows older than --keep-raw-days go, summaries stay.

Usage: .venv/bin/python bench/synth.py OUT.db [--days 30] [--targets 100] [--start 2018-01-01]
       [--compact [--keep-raw-days 14]]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.compaction import compact  # noqa: E402
from probe.config import StoreSettings  # noqa: E402
from probe.store.schema import HEARTBEAT_COLUMNS, MEASUREMENT_COLUMNS  # noqa: E402
from probe.store.sqlite import _insert, open_store  # noqa: E402

PATHS = [
    ("direct", "direct", "", None),
    ("vpn", "socks5", "shadowsocks", None),
    ("wg", "bind", "wireguard", None),
    ("proxy", "http", "", None),
]
MEAN_MS = {"direct": 35.0, "vpn": 160.0, "wg": 120.0, "proxy": 90.0}
INTERVAL_MS = 300_000
BATCH_ROUNDS = 288  # a day: written, then compacted, as the daemon does (hourly)
SHA256 = "ea8fac7c65fb589b0d53560f5251f74f9e9b243478dcb6b3ea79b5e36449c8d9"


def build(
    db: Path,
    days: int,
    targets: int,
    start: datetime,
    seed: int = 1,
    keep_raw_days: float | None = None,
    rounds: int | None = None,
) -> int:
    """Write the store (`rounds` 5-minute rounds instead of `days` days); with
    `keep_raw_days`, compact it after every batch as the daemon would."""
    rng = np.random.default_rng(seed)
    store = open_store(db)
    store.record_paths(PATHS)
    conn = store._db  # the bench writes in bulk, as the store's single writer would
    names = [f"t{i:03d}" for i in range(targets)]
    groups = ["blocked" if i % 3 == 0 else "control" for i in range(targets)]
    t0 = int(start.timestamp() * 1000)
    rounds = days * 24 * 12 if rounds is None else rounds
    npc = [
        int(datetime(y, 3, 5, tzinfo=UTC).timestamp() * 1000) for y in range(start.year, start.year + days // 365 + 2)
    ]
    rows, beats, total = [], [], 0
    for r in range(rounds):
        slot = t0 + r * INTERVAL_MS
        day = datetime.fromtimestamp(slot / 1000, UTC)
        if day.day == 15 and day.hour < 6:
            continue  # the daemon was stopped
        crackdown = any(n <= slot < n + 3 * 86_400_000 for n in npc)
        noise = rng.random((targets, len(PATHS))) < 0.005
        latency = rng.lognormal(0, 0.25, (targets, len(PATHS)))
        lag = rng.exponential(0.2, (targets, len(PATHS)))
        for i, (name, group) in enumerate(zip(names, groups, strict=True)):
            at = slot + i * (INTERVAL_MS // targets)
            round_id = f"{at}-{name}"
            ok_count = 0
            for j, (path, *_) in enumerate(PATHS):
                failure = None
                operation = None
                if group == "blocked" and path == "direct":
                    failure, operation = "connection_reset", "tls_handshake"
                elif path == "vpn" and crackdown:
                    failure, operation = "eof_error", "http_round_trip"
                elif noise[i, j]:
                    failure, operation = "generic_timeout_error", "http_round_trip"
                ok = failure is None
                ok_count += ok
                connect = round(MEAN_MS[path] * latency[i, j], 2) if ok else None
                url = f"https://{name}.example/"
                tls = ok or operation == "http_round_trip"  # what the daemon stores for an https page
                rows.append(
                    (
                        "bench",
                        round_id,
                        name,
                        group,
                        path,
                        "http",
                        url,
                        at + j,
                        int(ok),
                        failure,
                        operation,
                        5.0 if ok else None,
                        None,
                        connect,
                        connect and connect * 1.2,
                        connect and connect * 3,
                        connect and connect * 4,
                        "system",
                        None,
                        json.dumps(["93.184.216.34"]),
                        "93.184.216.34" if ok else None,
                        200 if ok else None,
                        url if ok else None,
                        5000 if ok else None,
                        SHA256 if ok else None,
                        "Example Domain" if ok else None,
                        "TLSv1.3" if tls else None,
                        f"CN={name}.example" if tls else None,
                        "CN=R3,O=Let's Encrypt,C=US" if tls else None,
                        1767225600000 if tls else None,
                        1 if tls else None,
                        "",
                        round(float(lag[i, j]), 3),
                    )
                )
            beats.append((round_id, "bench", at, at + 2000, len(PATHS), ok_count, "", name, at))
        if r % BATCH_ROUNDS == BATCH_ROUNDS - 1 or r == rounds - 1:
            conn.execute("BEGIN")
            conn.executemany(_insert("measurements", MEASUREMENT_COLUMNS), rows)
            conn.executemany(_insert("heartbeats", HEARTBEAT_COLUMNS), beats)
            conn.execute("COMMIT")
            total += len(rows)
            rows, beats = [], []
            if keep_raw_days is not None:
                compact(db, INTERVAL_MS / 1000, keep_raw_days, datetime.fromtimestamp(slot / 1000 + 7200, UTC))
    store.close()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--start", default="2018-01-01")
    parser.add_argument("--compact", action="store_true", help="compact as the daemon does")
    parser.add_argument("--keep-raw-days", type=float, default=StoreSettings().keep_raw_days)
    args = parser.parse_args()
    args.out.unlink(missing_ok=True)
    started = time.perf_counter()
    start = datetime.fromisoformat(args.start).replace(tzinfo=UTC)
    count = build(args.out, args.days, args.targets, start, keep_raw_days=args.keep_raw_days if args.compact else None)
    print(f"{count:,} measurements in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
