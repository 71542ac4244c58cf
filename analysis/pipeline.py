"""From the store to answers: outages per (target, path) and per path, degradation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from probe.config import Config
from probe.errors import ConfigError

from .frames import Source, Store, vantages
from .outages import Hysteresis, degraded, pair_outages, path_outages
from .ranges import Held, load_range
from .summary import Summary

BASELINE = pd.Timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Analysis:
    summary: Summary
    pairs: pd.DataFrame  # outages per (target, path)
    paths: pd.DataFrame  # outages per path, degradation included

    @property
    def span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        return self.summary.span


def store_of(cfg: Config) -> Source:
    """The store the analysis commands read: analysis.store (a path or a PostgreSQL URL) or
    store.path, narrowed to analysis.vantage."""
    where = cfg.analysis.store.get_secret_value() if cfg.analysis.store else None
    location: Path | str = cfg.store.path
    if where:
        location = where if where.startswith(("postgresql://", "postgres://")) else Path(where)
    return Source(location, cfg.analysis.vantage)


def source(cfg: Config) -> Store:
    """`store_of`, checked: the central store of several vantage points needs one chosen."""
    chosen = store_of(cfg)
    if chosen.vantage is None and not chosen.central:
        return chosen  # a vantage point's own store
    held = vantages(chosen)
    if chosen.vantage is None and len(held) > 1:
        raise ConfigError(
            f"{chosen}: holds {len(held)} vantage points ({', '.join(held)}); choose one with "
            "--vantage, or see them all with `tunnelwatch outages --fleet`"
        )
    if chosen.vantage is None and held:
        return Source(chosen.location, held[0])  # the only one: its rows by the (vantage, time) index
    if chosen.vantage is not None and chosen.vantage not in held:
        raise ConfigError(f"{chosen}: no vantage point {chosen.vantage!r} there; it holds {', '.join(held) or 'none'}")
    return chosen


def analyse_config(
    cfg: Config,
    since: datetime | None,
    until: datetime | None,
    *,
    held: Held | None = None,
    loaded: Loaded | None = None,
    **filters: tuple[str, ...],
) -> Analysis:
    """`analyse` with the config's store and settings; `held`: the store's summaries kept in
    memory (ranges.Held), for a process that answers many ranges; `loaded`: the range as
    `load_config_range` read it already."""
    return analyse(
        source(cfg),
        since,
        until,
        slot_s=cfg.probe.interval_s,
        hysteresis=Hysteresis(
            cfg.analysis.open_after, cfg.analysis.close_after, settle_after=cfg.analysis.settle_after
        ),
        degraded_factor=cfg.analysis.degraded_factor,
        degraded_min_ms=cfg.analysis.degraded_min_ms,
        held=held,
        loaded=loaded,
        **filters,
    )


Loaded = tuple[Summary, pd.DataFrame]  # a range's summary and the latency its degradation is judged against


def load_config_range(cfg: Config, since: datetime | None, until: datetime | None, held: Held | None = None) -> Loaded:
    """What `analyse_config` reads of the store, for a caller that uses the summary before the
    outages are found (the dashboard draws its charts meanwhile)."""
    return load_range(source(cfg), since, until, BASELINE, cfg.probe.interval_s, held)


def analyse(
    db: Store,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    targets: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    hysteresis: Hysteresis = Hysteresis(),
    slot_s: float = 300,
    degraded_factor: float = 3.0,
    degraded_min_ms: float = 50.0,
    held: Held | None = None,
    loaded: Loaded | None = None,
) -> Analysis:
    # Verdicts compare a target's paths and look at control targets, so summaries cover
    # every target and path; the filters apply to the results. Latency is read from a week
    # earlier: degradation is judged against the 7 days before.
    start = None if since is None else pd.Timestamp(since)
    summary, latency = load_range(db, since, until, BASELINE, slot_s, held) if loaded is None else loaded
    pairs = pair_outages(summary.runs, hysteresis)
    slow = degraded(latency, baseline=f"{BASELINE.days}D", factor=degraded_factor, min_increase_ms=degraded_min_ms)
    if start is not None and len(slow):
        slow = slow[slow["end"] > start].assign(start=lambda f: f["start"].mask(f["start"] < start, start))
        slow["minutes"] = (slow["end"] - slow["start"]).dt.total_seconds() / 60
    by_path = pd.concat(
        [f for f in (path_outages(pairs), slow) if not f.empty] or [path_outages(pairs)], ignore_index=True
    )
    if targets:
        pairs = pairs[pairs["target"].isin(targets)]
        by_path = path_outages(pairs)
    if paths:
        pairs = pairs[pairs["path"].isin(paths)]
        by_path = by_path[by_path["path"].isin(paths)]
    summary = summary.only(targets, paths)
    return Analysis(summary, pairs.reset_index(drop=True), by_path.reset_index(drop=True))
