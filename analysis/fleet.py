"""The fleet's verdict: an outage is called for the fleet when enough vantage points agree.

Each vantage point's outages come from its own analysis (its verdicts compare its own
paths). Here they are laid side by side per (target, verdict), and the fleet has an
outage while at least `quorum` distinct vantage points have one of that kind at once:
censorship seen by one vantage point in one city is a finding about that ISP; seen by
n of m, it is the country's.
"""

from __future__ import annotations

import pandas as pd

FLEET_COLUMNS = ["target", "verdict", "start", "end", "minutes", "agree", "vantages"]


def fleet_outages(outages: pd.DataFrame, members: int, quorum: int) -> pd.DataFrame:
    """`outages`: rows with vantage, target, verdict, start and end; `members`: how many
    vantage points were analysed. Intervals where at least `quorum` agreed."""
    rows = []
    for (target, verdict), group in outages.groupby(["target", "verdict"], sort=True):
        # Ends sort before starts at the same moment, so touching outages do not overlap.
        edges = sorted(
            [(s, 1, v) for s, v in zip(group["start"], group["vantage"], strict=True)]
            + [(e, -1, v) for e, v in zip(group["end"], group["vantage"], strict=True)],
            key=lambda edge: (edge[0], edge[1]),
        )
        active: dict[str, int] = {}
        opened: pd.Timestamp | None = None
        agreeing: set[str] = set()
        most = 0
        for moment, step, vantage in edges:
            active[vantage] = active.get(vantage, 0) + step
            now = {v for v, n in active.items() if n > 0}
            if opened is None and len(now) >= quorum:
                opened, agreeing, most = moment, set(now), len(now)
            elif opened is not None and len(now) >= quorum:
                agreeing |= now
                most = max(most, len(now))
            elif opened is not None:
                rows.append(
                    {
                        "target": target,
                        "verdict": verdict,
                        "start": opened,
                        "end": moment,
                        "agree": f"{most}/{members}",
                        "vantages": tuple(sorted(agreeing)),
                    }
                )
                opened = None
    frame = pd.DataFrame(rows, columns=[c for c in FLEET_COLUMNS if c != "minutes"])
    frame["minutes"] = (frame["end"] - frame["start"]).dt.total_seconds() / 60 if len(frame) else pd.Series(dtype=float)
    return frame[FLEET_COLUMNS]
