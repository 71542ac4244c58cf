"""The History page's charts: `tunnelwatch chart weekly`'s figures (report.py weekly_figures,
charts.py) for any range, as SVG to inline in the page or as PNG (draw.py).

The figures are the weekly charts' own. Over ranges longer than a fortnight their time axes
have date ticks that fit the range (charts._time_axis: a tick a day is unreadable over a
year). Over any range the dense artists are drawn as an image inside the SVG
(draw.dense_as_images). Over ranges longer than two months, availability and latency are
drawn by day (charts.coarser: a day's probes and failures added up, its percentiles the
samples-weighted mean of its hours'), as a year's 8,760 hours are more columns than the
chart has pixels; the outage timeline stays exact.
"""

from __future__ import annotations

from typing import Any

from probe.config import Config

from ..charts import BY_DAY, DAY, HOUR
from ..events import load_events
from ..pipeline import analyse_config, load_config_range
from ..report import outage_chart, span, summary_charts
from .draw import Drawn, drawn, later
from .pages import Range, held, outage_rows
from .pages import facts as facts_of

CHARTS = ("availability", "latency", "outages")


def history_charts(cfg: Config, chosen: Range, path: str | None, fmt: str) -> tuple[Drawn, dict[str, Any]]:
    """The three weekly charts over the range, drawn as `fmt` (svg or png), and the facts the
    page states beside them. Availability and latency are drawn in another process while the
    outages are found (draw.later)."""
    w = span(chosen.since.to_pydatetime(), chosen.until.to_pydatetime(), cfg.report.timezone)
    paths = (path,) if path else ()
    since, until = w.start.to_pydatetime(), w.end.to_pydatetime()
    kept = held(cfg)
    loaded = load_config_range(cfg, since, until, kept)
    step = DAY if w.end - w.start > BY_DAY else HOUR
    first = later(summary_charts(w, loaded[0].only((), paths), step), fmt)
    result = analyse_config(cfg, since, until, held=kept, loaded=loaded, paths=paths)
    events = load_events(cfg.analysis.events)
    timeline = drawn({"outages": outage_chart(cfg, w, events, result)}, fmt)
    hourly = result.summary.hourly
    sums = hourly.groupby("path", observed=True)[["probes", "failing"]].sum() if len(hourly) else None
    availability = (
        {}
        if sums is None
        else {str(p): round(100 * (1 - r["failing"] / r["probes"]), 3) for p, r in sums.iterrows() if r["probes"]}
    )
    facts = {
        "since": chosen.since,
        "until": chosen.until,
        "timezone": cfg.report.timezone,
        "path": path,
        "availability_pct": availability,
    }
    # the rows are JSON's already (outage_rows): not walked again, a year holds hundreds
    page = {**facts_of(facts), "outages": outage_rows(result, events)}
    return {**first(), **timeline}, page
