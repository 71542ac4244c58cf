"""Weekly charts. Functions return a matplotlib Figure and write nothing; only the CLI and
the report save files. Figures are built without pyplot, so nothing is kept alive globally.

Colours are colour-blind safe (Okabe-Ito; cividis for rates) and each path keeps one colour
across every chart. Hours with no measurement are drawn as "no data", never as failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.colors import to_rgba_array  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.ticker import FixedFormatter, FixedLocator, Formatter, NullLocator  # noqa: E402

from .events import Event  # noqa: E402
from .verdicts import (  # noqa: E402
    BLOCKED,
    DEGRADED,
    INCONCLUSIVE,
    LOCAL_OUTAGE,
    SITE_DOWN,
    TUNNEL_DOWN,
)

WIDTH_IN, DPI = 12.8, 100  # 1280 px
MIN_HEATMAP_IN = 3.2
OKABE_ITO = ("#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#D55E00", "#F0E442", "#000000")
VERDICT_COLOURS = {
    BLOCKED: "#D55E00",
    TUNNEL_DOWN: "#E69F00",
    LOCAL_OUTAGE: "#000000",
    SITE_DOWN: "#0072B2",
    DEGRADED: "#CC79A7",
    INCONCLUSIVE: "#999999",
}
NO_DATA = "#DDDDDD"
Chart = Callable[[], Figure]  # a chart with its data, drawn when called: picklable (a functools.partial)
HOUR, DAY = pd.Timedelta(hours=1), pd.Timedelta(days=1)
LONG_RANGE = pd.Timedelta(days=15)  # longer: ticks that fit the range rather than one a day
BY_DAY = pd.Timedelta(days=62)  # longer: no minor ticks (a year's weeks are 52 more to lay out)
# SmokePing colours its median by the loss in that interval; ours by the failure rate.
FAILURE_STEPS = (
    (0.0, "#009E73", "0 %"),
    (0.05, "#0072B2", "< 5 %"),
    (0.2, "#E69F00", "< 20 %"),
    (0.5, "#D55E00", "< 50 %"),
    (1.01, "#000000", ">= 50 %"),
)


def path_colours(paths: Iterable[str]) -> dict[str, str]:
    """One colour per path, stable for a given set of names."""
    return {path: OKABE_ITO[i % len(OKABE_ITO)] for i, path in enumerate(sorted(set(paths)))}


# matplotlib.dates has no annotations, so mypy --strict calls its functions untyped: the calls
# below are the only ones, each with `type: ignore[no-untyped-call]`.


def _days(times: pd.DatetimeIndex, tz: str) -> npt.NDArray[np.float64]:
    """Matplotlib's date numbers of `times` as wall-clock time in `tz` (the axes show local time)."""
    local = times.tz_convert(tz).tz_localize(None).to_numpy()
    return np.asarray(mdates.date2num(local), dtype=np.float64)  # type: ignore[no-untyped-call]


def _time_axis(ax: Axes, start: pd.Timestamp, end: pd.Timestamp, tz: str, labelled: bool = True) -> None:
    """Date ticks for the range, chosen once (a date locator is asked again at every drawing
    and layout pass: a second of a chart's drawing): a tick a day and every 6 hours over a
    week; over longer ranges (the dashboard's) as many as fit, by month over a year. Not
    `labelled` (an axes above another that shows the times): the ticks and grid lines alone."""
    left, right = _days(pd.DatetimeIndex([start, end]), tz)
    ax.set_xlim(float(left), float(right))
    lo, hi = mdates.num2date([float(left), float(right)])  # type: ignore[no-untyped-call]
    formatter: Formatter
    if end - start > LONG_RANGE:
        auto = mdates.AutoDateLocator(maxticks=14)  # type: ignore[no-untyped-call]
        major, formatter = auto.tick_values(lo, hi), mdates.ConciseDateFormatter(auto)  # type: ignore[no-untyped-call]
        minor = mdates.AutoDateLocator(maxticks=60).tick_values(lo, hi) if end - start <= BY_DAY else []  # type: ignore[no-untyped-call]
    else:
        major, formatter = mdates.DayLocator().tick_values(lo, hi), mdates.DateFormatter("%a %m-%d")  # type: ignore[no-untyped-call]
        minor = mdates.HourLocator(byhour=range(0, 24, 6)).tick_values(lo, hi)  # type: ignore[no-untyped-call]
    # the labels too, written once: a formatter is also asked at every drawing and layout pass
    labels = formatter.format_ticks(list(major))
    fixed = FixedFormatter(labels)
    fixed.set_offset_string(formatter.get_offset())
    ax.xaxis.set_minor_locator(NullLocator())
    majors, minors = np.asarray(major, dtype=float), np.asarray(minor, dtype=float)
    if len(majors):  # matplotlib's tolerance (Axis.get_minorticklocs): no minor tick on a major one
        near = (float(right) - float(left)) * 1e-5
        minors = minors[~np.isclose(minors[:, None], majors[None, :], rtol=0, atol=near).any(axis=1)]
    _marks(ax, minors, False, float(left), float(right))
    ax.xaxis.set_major_locator(FixedLocator(major))
    ax.xaxis.set_major_formatter(fixed)  # on every time axis: the dashboard finds them so (web/figures.py)
    if labelled:
        ax.grid(axis="x", which="major", color="#bbbbbb", linewidth=0.6)
    else:
        ax.xaxis.set_major_locator(NullLocator())
        ax.xaxis.offsetText.set_visible(False)  # as sharex hid it: the axis below shows the year or month
        shown = _marks(ax, majors, True, float(left), float(right))
        grid = np.full((len(shown), 3), np.nan)
        grid[:, 0], grid[:, 1] = 0, 1
        ax.add_artist(
            Line2D(
                np.repeat(shown, 3),
                grid.ravel(),
                transform=ax.get_xaxis_transform("grid"),
                color="#bbbbbb",
                linewidth=0.6,
                zorder=1.5,
            )
        )


def _marks(ax: Axes, ticks: npt.NDArray[np.float64], major: bool, left: float, right: float) -> npt.NDArray[np.float64]:
    """Time axis ticks (major or minor) as one line of tick markers: matplotlib draws
    each tick's mark so (a marker at the axis, of the same size, width and colour), but as one
    artist rather than a Tick of five: a week's 28 minor ticks per axes were half of a chart's
    drawing time. Those outside the axis are left out, as matplotlib leaves them out."""
    margin = (right - left) * 1e-10
    shown = ticks[(ticks >= left - margin) & (ticks <= right + margin)]
    if len(shown):
        rc = matplotlib.rcParams
        colour = rc["xtick.color"]
        size, width = (
            (rc["xtick.major.size"], rc["xtick.major.width"])
            if major
            else (rc["xtick.minor.size"], rc["xtick.minor.width"])
        )
        marks = Line2D(
            shown,
            np.zeros(len(shown)),
            transform=ax.get_xaxis_transform("tick1"),
            linestyle="none",
            marker=3,  # matplotlib.markers.TICKDOWN, as an x tick draws its mark
            markersize=size,
            markeredgewidth=width,
            color=colour,
            markeredgecolor=colour,
            clip_on=False,
            zorder=1.5,
        )
        ax.add_artist(marks)
    return shown


# A fixed layout, computed once from the few texts whose size varies (the rows' labels, the
# values on a y axis): constrained layout measures every artist at each of its passes, most
# of a chart's writing time. Sizes in points (1/72 in) at matplotlib's default font sizes.
LINE = 13.0  # a line of 10 pt text
TICK = 3.5 + 3.5 + LINE  # a tick, its pad, its label
EDGE = 6.0


def _text_width(renderer: RendererAgg, texts: Iterable[str], size: float = 10) -> float:
    """The widest of `texts` in points."""
    font = FontProperties(size=size)
    widths = [float(renderer.get_text_width_height_descent(t, font, ismath=False)[0]) for t in texts]  # type: ignore[no-untyped-call]
    return max(widths, default=0.0) * 72 / DPI


def _renderer(fig: Figure) -> RendererAgg:
    renderer: RendererAgg = FigureCanvasAgg(fig).get_renderer()  # type: ignore[no-untyped-call]
    return renderer


def _value_labels(ax: Axes) -> list[str]:
    """The y axis' tick labels as they will be drawn (its limits set)."""
    axis = ax.yaxis
    return [str(t) for t in axis.get_major_formatter().format_ticks(list(axis.get_majorticklocs()))]


def _below(ax: Axes) -> float:
    """The height of the time axis' ticks and labels, and of its offset text (a year, a month) if any."""
    formatter = ax.xaxis.get_major_formatter()
    return TICK + (LINE if isinstance(formatter, FixedFormatter) and formatter.get_offset() else 0)


def _place(fig: Figure, axes: Sequence[Axes], left: float, right: float, top: float, bottom: float, gap: float) -> None:
    """`axes` stacked top to bottom in the figure, margins and the gap between them in points."""
    width, height = (float(v) * 72 for v in fig.get_size_inches())
    each = (height - top - bottom - gap * (len(axes) - 1)) / len(axes)
    for i, ax in enumerate(axes):
        y = bottom + (len(axes) - 1 - i) * (each + gap)
        ax.set_position((left / width, y / height, (width - left - right) / width, each / height))


def _period(start: pd.Timestamp, end: pd.Timestamp, tz: str) -> str:
    last = end.tz_convert(tz) - pd.Timedelta(seconds=1)
    return f"{start.tz_convert(tz):%a %Y-%m-%d} to {last:%a %Y-%m-%d}"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[first, last) index pairs of the runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def _hours(start: pd.Timestamp, end: pd.Timestamp, step: pd.Timedelta = HOUR) -> pd.DatetimeIndex:
    return pd.date_range(start, end, freq=step, inclusive="left")


def _unit(step: pd.Timedelta) -> str:
    return "hour" if step == HOUR else "day" if step == DAY else str(step)


def _every(step: pd.Timedelta) -> str:
    return "hourly" if step == HOUR else "daily" if step == DAY else f"per {step}"


def coarser(
    hourly: pd.DataFrame, latency: pd.DataFrame, start: pd.Timestamp, step: pd.Timedelta
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary's hours in bins of `step` from `start`, for a chart over a long range:
    probes and failing probes added up (a bin's rate is exact), each percentile the mean of
    its hours' weighted by their samples (close: the hours of a day differ little)."""

    def bins(frame: pd.DataFrame) -> pd.Series:
        return start + ((frame["hour"] - start) // step) * step

    counts = (
        hourly.assign(hour=bins(hourly)).groupby(["hour", "group", "path"], as_index=False)[["probes", "failing"]].sum()
        if len(hourly)
        else hourly
    )
    if latency.empty:
        return counts, latency
    values = [c for c in latency.columns if c not in ("hour", "path", "samples")]
    weighted = latency[values].mul(latency["samples"], axis=0)
    present = latency[values].notna().mul(latency["samples"], axis=0)  # a missing percentile weighs nothing
    keys = [bins(latency).rename("hour"), latency["path"]]
    sums = weighted.groupby(keys).sum(min_count=1)
    weights = present.groupby(keys).sum()
    means = (sums / weights.where(weights > 0)).assign(samples=latency["samples"].groupby(keys).sum())
    return counts, means.reset_index()[list(latency.columns)]


def availability_heatmap(
    hourly: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, tz: str, step: pd.Timedelta = HOUR
) -> Figure:
    """One row per path (grouped by target group), one column per hour; colour = success rate.
    `hourly` is the summary's probes and failing probes per (hour, group, path); over a long
    range, per `step` from `start` (`coarser`)."""
    hours = _hours(start, end, step)
    keys = pd.MultiIndex.from_arrays([hourly["group"].astype(str), hourly["path"].astype(str)])
    rows: list[tuple[str, str]] = sorted(keys.unique()) if len(hourly) else []
    matrix = np.full((max(1, len(rows)), len(hours)), np.nan)
    if len(hourly):
        column = hours.get_indexer(pd.DatetimeIndex(hourly["hour"]))  # -1: an hour outside the chart
        row_of = pd.MultiIndex.from_tuples(rows).get_indexer(keys)
        probes = hourly["probes"].to_numpy(dtype="float64")
        failing = hourly["failing"].to_numpy(dtype="float64")
        shown = (column >= 0) & (probes != 0)
        matrix[row_of[shown], column[shown]] = 1 - failing[shown] / probes[shown]
    # never shorter than the vertical labels (the axis' and the colour bar's) are long
    height = max(MIN_HEATMAP_IN, 1.6 + 0.32 * len(rows))
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
    ax = fig.add_subplot()
    cax = fig.add_axes((0.9, 0.1, 0.01, 0.8))
    cmap = matplotlib.colormaps["cividis"].with_extremes(bad=NO_DATA)
    x = _days(pd.DatetimeIndex([*hours, end]), tz)
    image = ax.pcolormesh(x, np.arange(len(matrix) + 1), np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1)
    for row, values in enumerate(matrix):
        for first, last in _runs(np.isnan(values)):
            ax.add_patch(
                Rectangle(
                    (x[first], row),
                    x[last] - x[first],
                    1,
                    facecolor=NO_DATA,
                    hatch="///",
                    edgecolor="#999999",
                    linewidth=0,
                )
            )
    colours = path_colours(p for _, p in rows)
    ax.set_yticks(np.arange(len(rows)) + 0.5, [f"{group} · {path}" for group, path in rows])
    for label, (_, path) in zip(ax.get_yticklabels(), rows, strict=False):
        label.set_color(colours[path])
    ax.set_ylim(len(matrix), 0)
    _time_axis(ax, start, end, tz)
    ax.set_xlabel(f"time ({tz})")
    ax.set_ylabel("target group · path")
    # titles at a fixed height (y=1.0: nothing is drawn above an axes), else matplotlib places
    # them again at each drawing, measuring every label of the axes
    ax.set_title(f"Availability per {_unit(step)}, {_period(start, end, tz)}", y=1.0)
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("success rate\n(share of probes that worked)")
    fig.legend(
        handles=[Patch(facecolor=NO_DATA, hatch="///", edgecolor="#888888", label="no data (not measuring)")],
        loc="lower right",
        bbox_to_anchor=(1, 0),
        frameon=False,
    )
    renderer = _renderer(fig)
    left = EDGE + LINE + 4 + TICK - LINE + _text_width(renderer, (t.get_text() for t in ax.get_yticklabels()))
    bar_width = (height * 72 - 2 * LINE - 2 * TICK - 30) / 20  # the colour bar's usual aspect, 20
    right = EDGE + 2 * LINE + 4 + TICK - LINE + _text_width(renderer, ["0.0"]) + bar_width + 10
    _place(fig, [ax], left, right, EDGE + LINE + 8, EDGE + _below(ax) + 4 + 2 * LINE + 10, 0)
    box = ax.get_position()
    cax.set_position((box.x1 + 10 / (WIDTH_IN * 72), box.y0, bar_width / (WIDTH_IN * 72), box.height))
    return fig


def _failure_colour(rate: float) -> str:
    return next(colour for limit, colour, _ in FAILURE_STEPS if rate <= limit or limit > 1)


def _failure_colours(rates: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`_failure_colour` of each rate, as RGBA rows: a year's hours at once."""
    limits = np.array([limit for limit, _, _ in FAILURE_STEPS])
    palette = to_rgba_array([colour for _, colour, _ in FAILURE_STEPS])
    step = np.minimum(np.searchsorted(limits, rates, side="left"), len(limits) - 1)
    colours: npt.NDArray[np.float64] = palette[step]
    return colours


def latency_smoke(
    latency: pd.DataFrame,
    hourly: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    tz: str,
    metric: str = "connect",
    step: pd.Timedelta = HOUR,
) -> Figure:
    """Per path, SmokePing-style: the hourly median of `metric` as a line coloured by that
    hour's failure rate, with grey bands for the 10-90 and 25-75 percentiles. `latency` and
    `hourly` are the summary's percentiles and counts per hour."""
    paths = sorted(latency["path"].astype(str).unique()) or ["(none)"]
    fig = Figure(figsize=(WIDTH_IN, 1.2 + 1.9 * len(paths)), dpi=DPI)
    # not sharex: the axes above the last draw their time ticks alone, without Tick objects (_time_axis)
    axes = fig.subplots(len(paths), 1, squeeze=False)[:, 0]
    colours = path_colours(paths)
    hours = _hours(start, end, step)
    label = metric.replace("_", " ")
    for ax, path in zip(axes, paths, strict=True):
        mine = latency[latency["path"] == path].set_index("hour")
        q = pd.DataFrame(
            {p: mine[f"{metric}_p{round(p * 100)}"] for p in (0.1, 0.25, 0.5, 0.75, 0.9)}, dtype=float
        ).reindex(hours)
        h = hourly[hourly["path"] == path]
        if (h["group"] == "control").any():  # the path's health, not the censorship of blocked sites
            h = h[h["group"] == "control"]
        sums = h.groupby("hour")[["failing", "probes"]].sum()
        failure = (sums["failing"] / sums["probes"]).reindex(hours)
        x = _days(hours + step / 2, tz)
        if not q.empty and q.notna().any().any():
            ax.fill_between(x, q[0.1], q[0.9], color="#cccccc", step="mid", linewidth=0, label="10-90 %")
            ax.fill_between(x, q[0.25], q[0.75], color="#999999", step="mid", linewidth=0, label="25-75 %")
            points = np.column_stack([x, q[0.5].to_numpy()])
            segments = np.stack([points[:-1], points[1:]], axis=1)
            rates = failure.fillna(0).to_numpy()[:-1]
            keep = ~np.isnan(segments).any(axis=(1, 2))
            # drawn right after the bands (zorder 1, as they are): on the dashboard the three are one
            # image in the SVG rather than two (web/draw.py); the grid lines cross over them
            line = LineCollection(segments[keep], colors=_failure_colours(rates[keep]), linewidths=2, zorder=1)
            ax.add_collection(line, autolim=False)  # the limits are set: no need to measure a year's segments
            ax.set_ylim(0, float(np.nanmax(q[0.9].to_numpy())) * 1.15 or 1)
        ax.set_ylabel(f"{label} (ms)")
        ax.set_title(path, loc="left", color=colours.get(path, "black"), fontweight="bold", fontsize=10, y=1.0)
        _time_axis(ax, start, end, tz, labelled=ax is axes[-1])
    axes[-1].set_xlabel(f"time ({tz}); {_unit(step)}s without a line had no successful probe")
    fig.suptitle(
        f"Latency ({label}) per path, {_period(start, end, tz)}: {_every(step)} median coloured by the "
        "failure rate on control targets"
    )
    handles = [Patch(color="#cccccc", label="10-90 percentile"), Patch(color="#999999", label="25-75 percentile")]
    handles += [Patch(color=colour, label=f"median, control failures {text}") for _, colour, text in FAILURE_STEPS]
    # two rows: seven entries in one row are wider than the image, and a figure legend is never shrunk
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0), ncol=4, frameon=False, fontsize=8)
    renderer = _renderer(fig)
    values = _text_width(renderer, [label for ax in axes for label in _value_labels(ax)])
    left = EDGE + LINE + 4 + TICK - LINE + values
    _place(
        fig, list(axes), left, EDGE + 30, EDGE + 16 + 6 + LINE + 6, EDGE + _below(axes[-1]) + 4 + LINE + 34, LINE + 8
    )
    return fig


def _bars(ax: Axes, spans: Sequence[tuple[float, float]], rows: tuple[float, float], **style: Any) -> None:
    """`ax.broken_barh(spans, rows, **style)`, the same rectangles in one PolyCollection, without
    measuring them for the data limits (the timeline sets its limits): a year holds hundreds."""
    y0, y1 = rows[0], rows[0] + rows[1]
    vertices = np.array([[(x, y0), (x, y1), (x + dx, y1), (x + dx, y0)] for x, dx in spans], dtype=float)
    ax.add_collection(PolyCollection(vertices, **style), autolim=False)  # type: ignore[arg-type]  # an (N, 4, 2) array, as broken_barh passes


def outage_timeline(
    outages: pd.DataFrame,
    gaps: pd.DataFrame,
    events: Sequence[Event],
    paths: Sequence[str],
    start: pd.Timestamp,
    end: pd.Timestamp,
    tz: str,
) -> Figure:
    """Bars per path coloured by verdict, daemon gaps hatched; event windows in lanes above,
    shaded lightly across the paths."""
    spans = (
        list(zip(outages["path"], outages["start"], outages["end"], outages["verdict"], strict=True))
        if len(outages)
        else []
    )
    paths = sorted({str(p) for p in paths} | {str(span[0]) for span in spans}) or ["(none)"]

    lo, hi = (float(v) for v in _days(pd.DatetimeIndex([start, end]), tz))
    # every event's window at once (a calendar holds a hundred)
    windows = _days(pd.DatetimeIndex([t for e in events for t in e.window], tz="UTC"), tz).reshape(-1, 2)
    shown = [(e, max(lo, float(a)), min(hi, float(b))) for e, (a, b) in zip(events, windows, strict=True)]
    shown = [(e, a, b) for e, a, b in shown if b > a]
    lanes = [f"event: {e.category}" for e, _, _ in shown]
    fig = Figure(figsize=(WIDTH_IN, 2.2 + 0.45 * (len(paths) + len(lanes))), dpi=DPI)
    ax = fig.add_subplot()
    colours = path_colours(paths)
    for lane, (event, a, b) in enumerate(shown):
        _bars(ax, [(a, b - a)], (lane - 0.35, 0.7), color="#56B4E9", alpha=0.5, zorder=2)
        # a title is text, never mathtext: a "$" in an imported title must not fail the chart
        ax.text(
            a + (hi - lo) * 0.003,
            lane,
            event.title[:90],
            fontsize=8,
            va="center",
            ha="left",
            zorder=3,
            clip_on=True,
            parse_math=False,
        )
        ax.axvspan(a, b, ymin=0, ymax=1, color="#56B4E9", alpha=0.08, linewidth=0, zorder=0)
    first = len(lanes)
    # each row's bars in one collection (a year holds hundreds), drawn in the outages' order
    bars = pd.DataFrame(spans, columns=["path", "start", "end", "verdict"])
    bars["a"] = np.maximum(lo, _days(pd.DatetimeIndex(bars["start"]), tz)) if len(bars) else []
    bars["b"] = np.minimum(hi, _days(pd.DatetimeIndex(bars["end"]), tz)) if len(bars) else []
    bars = bars[bars["b"] > bars["a"]]
    holes = (
        [
            (a, b)
            for a, b in zip(
                _days(pd.DatetimeIndex(gaps["start"]), tz), _days(pd.DatetimeIndex(gaps["end"]), tz), strict=True
            )
        ]
        if len(gaps)
        else []
    )
    holes = [(max(lo, a), min(hi, b)) for a, b in holes if min(hi, b) > max(lo, a)]
    for row, path in enumerate(paths, start=first):
        mine = bars[bars["path"].astype(str) == path]
        if len(mine):
            _bars(
                ax,
                list(zip(mine["a"], mine["b"] - mine["a"], strict=True)),
                (row - 0.35, 0.7),
                color=[VERDICT_COLOURS.get(str(v), "#999999") for v in mine["verdict"]],
                zorder=2,
            )
        if holes:
            _bars(
                ax,
                [(a, b - a) for a, b in holes],
                (row - 0.35, 0.7),
                facecolor=NO_DATA,
                hatch="///",
                edgecolor="#888888",
                zorder=2,  # over the row's bars, drawn after them: with them one image on the dashboard
            )
    ax.set_yticks(range(first + len(paths)), lanes + paths)
    for label, name in zip(ax.get_yticklabels(), lanes + paths, strict=True):
        label.set_color(colours.get(name, "#444444"))
    if lanes:
        ax.axhline(first - 0.5, color="#888888", linewidth=0.8)
    ax.set_ylim(first + len(paths) - 0.4, -0.6)
    _time_axis(ax, start, end, tz)
    ax.set_xlabel(f"time ({tz})")
    ax.set_ylabel("events · paths")
    ax.set_title(f"Outages by path and verdict, {_period(start, end, tz)}", y=1.0)
    handles = [Patch(color=c, label=v.replace("_", " ")) for v, c in VERDICT_COLOURS.items()]
    handles += [
        Patch(facecolor=NO_DATA, hatch="///", edgecolor="#888888", label="no data"),
        Patch(color="#56B4E9", alpha=0.5, label="event window"),
    ]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0), ncol=len(handles), frameon=False)
    left = EDGE + LINE + 4 + TICK - LINE + _text_width(_renderer(fig), lanes + paths)
    _place(fig, [ax], left, EDGE + 30, EDGE + LINE + 8, EDGE + _below(ax) + 4 + LINE + 24, 0)
    return fig
