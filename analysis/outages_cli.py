"""`tunnelwatch outages`: the outage intervals of one vantage point, or those enough vantage
points of the fleet agree on, with the events they overlap. Argument parsing and output
only; the work is in pipeline.py and fleet.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import click
import pandas as pd

from probe.config import Config
from probe.console import err

from . import options
from .events import overlapping, overlapping_each
from .fleet import FLEET_COLUMNS, fleet_outages
from .frames import vantages
from .pipeline import Analysis, analyse_config, store_of

COLUMNS = [
    *("path", "targets", "start", "end", "duration", "minutes", "verdict", "rules", "factor", "failed_share"),
    *("events", "ongoing"),
]


@click.command()
@options.since_until("From this date or time (UTC unless it has an offset).", "Up to this date or time.")
@options.paths_targets("Only this path (repeatable).", "Only this target (repeatable).")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only this verdict: blocked, tunnel_down, local_outage, site_down, degraded, inconclusive (repeatable).",
)
@click.option(
    "--by",
    type=click.Choice(["path", "target"]),
    default="path",
    show_default=True,
    help="One row per path outage, or per (target, path) outage.",
)
@options.events_option("More events (TOML or .ics) to match outages against.")
@click.option(
    "--fleet",
    is_flag=True,
    help="Every vantage point of the store side by side: outages that at least --quorum of them agree on.",
)
@click.option(
    "--quorum",
    type=click.IntRange(min=1),
    help="Vantage points that must agree (with --fleet; default: analysis.fleet_quorum).",
)
@options.format_option
@options.store_options
def outages(
    since: datetime | None,
    until: datetime | None,
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    kinds: tuple[str, ...],
    by: str,
    event_files: tuple[Path, ...],
    fleet: bool,
    quorum: int | None,
    fmt: str,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """Outage intervals with their verdict, duration and the events they overlap."""
    options.check_range(since, until)
    cfg = options.configured(config, store, vantage)
    events = options.events_of(cfg, event_files)

    def analysed(one: Config) -> Analysis:
        return analyse_config(one, since, until, targets=targets, paths=paths)

    if fleet:
        quorum = quorum or cfg.analysis.fleet_quorum
        held, agreed = _fleet(cfg, analysed, quorum)
        rows = [
            {**{str(key): value for key, value in row.items()}, "events": overlapping(row["start"], row["end"], events)}
            for row in _only(agreed, kinds).sort_values(["start", "target"]).to_dict("records")
        ]
        title = f"outages {quorum} of {len(held)} vantage points agree on (times UTC)"
        options.emit(rows, [*FLEET_COLUMNS, "events"], fmt, title)
        if fmt == "table" and not rows:
            err.print(f"no outage that {quorum} of the {len(held)} vantage points ({', '.join(held)}) agree on")
        return
    result = analysed(cfg)
    frame = _only(result.paths if by == "path" else result.pairs, kinds)
    rows = []
    ordered = frame.sort_values(["start", "path"])
    hits = overlapping_each(ordered["start"], ordered["end"], events)
    for row, overlaps in zip(ordered.to_dict("records"), hits, strict=True):
        row["duration"] = duration(row["minutes"])
        row["events"] = overlaps
        row["targets"] = row["targets"] if by == "path" else (row["target"],)
        rows.append({str(key): value for key, value in row.items()})
    options.emit(rows, COLUMNS, fmt, f"outages by {by} (times UTC)")
    if fmt == "table" and not rows:
        err.print("no outages in that range" if result.span else "no measurements in that range")


def duration(minutes: float) -> str:
    """An outage's length to the second, as [D days ]HH:MM:SS (a 30 s outage is not 00:00:00)."""
    return str(pd.Timedelta(seconds=round(minutes * 60))).removeprefix("0 days ")


def _only(outages: pd.DataFrame, kinds: tuple[str, ...]) -> pd.DataFrame:
    return outages[outages["verdict"].isin(kinds)] if kinds else outages


def _fleet(cfg: Config, analysed: Callable[[Config], Analysis], quorum: int) -> tuple[list[str], pd.DataFrame]:
    """The store's vantage points, each analysed alone, and the outages `quorum` of them agree on."""
    if cfg.analysis.vantage:
        raise click.BadParameter("--fleet reads every vantage point; leave out --vantage")
    held = vantages(store_of(cfg))
    each = []
    for name in held:
        one = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={"vantage": name})})
        each.append(analysed(one).pairs.assign(vantage=name))
    every = (
        pd.concat(each, ignore_index=True)
        if each
        else pd.DataFrame(columns=["vantage", "target", "verdict", "start", "end"])
    )
    return held, fleet_outages(every, len(held), quorum)
