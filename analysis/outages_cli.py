"""`tunnelwatch outages`: the outage intervals of one vantage point, or those enough vantage
points of the fleet agree on, with the events they overlap. Argument parsing and output
only; the work is in pipeline.py and fleet.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import click
import pandas as pd

from probe.config import Config
from probe.console import err

from .events import Event, overlapping
from .fleet import FLEET_COLUMNS, fleet_outages
from .frames import vantages
from .options import (
    check_range,
    configured,
    emit,
    events_of,
    events_option,
    format_option,
    paths_targets,
    since_until,
    store_options,
)
from .pipeline import analyse_config, store_of

COLUMNS = ["path", "targets", "start", "end", "duration", "minutes", "verdict", "rules", "factor", "events", "ongoing"]


@click.command()
@since_until("From this date or time (UTC unless it has an offset).", "Up to this date or time.")
@paths_targets("Only this path (repeatable).", "Only this target (repeatable).")
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
@events_option("More events (TOML or .ics) to match outages against.")
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
@format_option
@store_options
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
    check_range(since, until)
    cfg = configured(config, store, vantage)
    events = events_of(cfg, event_files)
    if fleet:
        _fleet(cfg, since, until, targets, paths, kinds, quorum or cfg.analysis.fleet_quorum, events, fmt)
        return
    result = analyse_config(cfg, since, until, targets=targets, paths=paths)
    frame = result.paths if by == "path" else result.pairs
    if kinds:
        frame = frame[frame["verdict"].isin(kinds)]
    rows = []
    for row in frame.sort_values(["start", "path"]).to_dict("records"):
        row["duration"] = str(pd.Timedelta(minutes=round(row["minutes"]))).removeprefix("0 days ")
        row["events"] = overlapping(row["start"], row["end"], events)
        row["targets"] = row["targets"] if by == "path" else (row["target"],)
        rows.append({str(key): value for key, value in row.items()})
    emit(rows, COLUMNS, fmt, f"outages by {by} (times UTC)")
    if fmt == "table" and not rows:
        err.print("no outages in that range" if result.span else "no measurements in that range")


def _fleet(
    cfg: Config,
    since: datetime | None,
    until: datetime | None,
    targets: tuple[str, ...],
    paths: tuple[str, ...],
    kinds: tuple[str, ...],
    quorum: int,
    events: Sequence[Event],
    fmt: str,
) -> None:
    """Each vantage point analysed alone, then the outages enough of them agree on."""
    if cfg.analysis.vantage:
        raise click.BadParameter("--fleet reads every vantage point; leave out --vantage")
    held = vantages(store_of(cfg))
    each = []
    for name in held:
        one = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={"vantage": name})})
        each.append(analyse_config(one, since, until, targets=targets, paths=paths).pairs.assign(vantage=name))
    frame = fleet_outages(
        pd.concat(each, ignore_index=True)
        if each
        else pd.DataFrame(columns=["vantage", "target", "verdict", "start", "end"]),
        len(held),
        quorum,
    )
    if kinds:
        frame = frame[frame["verdict"].isin(kinds)]
    rows = [
        {**{str(key): value for key, value in row.items()}, "events": overlapping(row["start"], row["end"], events)}
        for row in frame.sort_values(["start", "target"]).to_dict("records")
    ]
    emit(rows, [*FLEET_COLUMNS, "events"], fmt, f"outages {quorum} of {len(held)} vantage points agree on (times UTC)")
    if fmt == "table" and not rows:
        err.print(f"no outage that {quorum} of the {len(held)} vantage points ({', '.join(held)}) agree on")
