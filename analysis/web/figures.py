"""The History page's charts: `tunnelwatch chart weekly`'s figures (report.py weekly_figures,
charts.py) for any range, as SVG to inline in the page or as PNG.

The figures are the weekly charts' own. Over ranges longer than a fortnight their time axes
have date ticks that fit the range (charts._time_axis: a tick a day is unreadable over a
year). Over any range the dense artists (the heatmap's hours, the latency bands and lines)
are drawn as an image inside the SVG, so a chart is one picture rather than thousands of
vector shapes (a week's heatmap was 250 KiB of them, and most of its writing time). Over
ranges longer than two months, availability and latency are drawn by day (charts.coarser: a
day's probes and failures added up, its percentiles the samples-weighted mean of its hours'),
as a year's 8,760 hours are more columns than the chart has pixels; the outage timeline
stays exact.
"""

from __future__ import annotations

import io
import re
from typing import Any

import matplotlib
from matplotlib.collections import LineCollection, PolyCollection, QuadMesh
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter

from probe.config import Config

from ..charts import BY_DAY, DAY, HOUR
from ..events import load_events
from ..pipeline import analyse_config
from ..report import span, weekly_figures
from .pages import Range, held, outage_rows
from .pages import facts as facts_of

CHARTS = ("availability", "latency", "outages")


def history_figures(cfg: Config, chosen: Range, path: str | None) -> tuple[dict[str, Figure], dict[str, Any]]:
    """The three weekly charts over the range, and the facts the page states beside them."""
    w = span(chosen.since.to_pydatetime(), chosen.until.to_pydatetime(), cfg.report.timezone)
    paths = (path,) if path else ()
    result = analyse_config(cfg, w.start.to_pydatetime(), w.end.to_pydatetime(), held=held(cfg), paths=paths)
    events = load_events(cfg.analysis.events)
    figures = weekly_figures(cfg, w, events, result, DAY if w.end - w.start > BY_DAY else HOUR)
    for figure in figures.values():
        _dense_as_images(figure)
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
    return figures, {**facts_of(facts), "outages": outage_rows(result, events)}


def _dense_as_images(figure: Figure) -> None:
    # the dense artists of the time axes (charts._time_axis: their labels fixed), whatever the range
    timed = [ax for ax in figure.axes if isinstance(ax.xaxis.get_major_formatter(), FixedFormatter)]
    for ax in timed:
        for artist in ax.get_children():
            if isinstance(artist, (QuadMesh, LineCollection, PolyCollection)):
                artist.set_rasterized(True)


SVG_HEAD = re.compile(r"^.*?(?=<svg)", re.DOTALL)


def svg(figure: Figure) -> str:
    """The figure as an <svg> element to put in a page (no XML prologue, no DOCTYPE)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: selectable, found by a search
        figure.savefig(buffer, format="svg")
    return SVG_HEAD.sub("", buffer.getvalue(), count=1)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
