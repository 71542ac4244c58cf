"""The weekly charts and report: files written here and by the CLI only.

The HTML report is self-contained (charts embedded as PNG data, no network fetches): the
three charts, the week's outages, the event check for events in or near the week, and the
change against the previous week. A Markdown summary is written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
from matplotlib.figure import Figure

from probe.config import Config
from probe.errors import ConfigError

from .charts import HOUR, Chart, availability_heatmap, coarser, latency_smoke, outage_timeline
from .eventcheck import Check, check_events, outage_series
from .events import Event, load_events, overlapping
from .eventstats import Method
from .options import FIRST_YEAR, LAST_YEAR
from .pipeline import Analysis, analyse_config, source
from .ranges import load_summary
from .summary import Summary

ISO_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
# The years whose weeks, with the weeks a report looks at around them, pandas' timestamps hold.
# The report holds the week and the CONTEXT_WEEKS before it: a baseline, a search and placebo
# dates that fit in them (`tunnelwatch events check` takes months by default).
REPORT_METHOD = Method(baseline=14, gap=2, shifts=(-1, 3), placebo_gap=5, two_sided=False)


@dataclass(frozen=True, slots=True)
class Week:
    start: pd.Timestamp  # UTC
    end: pd.Timestamp
    tz: str
    label: str

    @property
    def previous(self) -> Week:
        start = self.start - pd.Timedelta(days=7)
        return Week(start, self.start, self.tz, _label(start.tz_convert(self.tz).date()))


def week(label: str | None, tz: str, today: date | None = None) -> Week:
    """An ISO week (2018-W10) in the time zone; without a label, the last complete week."""
    zone = _zone(tz)
    if label is None:
        today = today or datetime.now(zone).date()
        monday = today - timedelta(days=today.weekday() + 7)
    else:
        monday = _monday(label)
    start = _midnight(monday, zone)
    return Week(start, start + pd.Timedelta(days=7), tz, _label(monday))


def this_week(tz: str, now: datetime | None = None) -> Week:
    """The current ISO week in the time zone, from its Monday to `now`: the week so far."""
    zone = _zone(tz)
    now = now or datetime.now(UTC)
    today = now.astimezone(zone).date()
    monday = today - timedelta(days=today.weekday())
    return Week(_midnight(monday, zone), pd.Timestamp(now).tz_convert("UTC"), tz, _label(monday))


def _midnight(day: date, zone: ZoneInfo) -> pd.Timestamp:
    return pd.Timestamp(datetime.combine(day, time(0), tzinfo=zone)).tz_convert("UTC")


def _monday(label: str) -> date:
    """The Monday of an ISO week written YYYY-Www; a ConfigError saying what is valid."""
    match = ISO_WEEK.match(label)
    if not match:
        raise ConfigError(f"--week {label!r} is not an ISO week; write YYYY-Www, e.g. 2018-W10")
    year, number = int(match.group(1)), int(match.group(2))
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise ConfigError(
            f"--week {label!r}: the year must be {FIRST_YEAR} to {LAST_YEAR}; write YYYY-Www, e.g. 2018-W10"
        )
    weeks = date(year, 12, 28).isocalendar().week  # 28 December is always in the year's last week
    if not 1 <= number <= weeks:
        raise ConfigError(
            f"--week {label!r}: {year} has weeks W01 to W{weeks}; write YYYY-Www, e.g. {year}-W{min(10, weeks):02d}"
        )
    return date.fromisocalendar(year, number, 1)


def _label(day: date) -> str:
    year, number, _ = day.isocalendar()
    return f"{year}-W{number:02d}"


def span(since: datetime, until: datetime, tz: str) -> Week:
    _zone(tz)
    start, end = pd.Timestamp(since).tz_convert("UTC"), pd.Timestamp(until).tz_convert("UTC")
    return Week(start, end, tz, f"{start.tz_convert(tz):%Y-%m-%d}_{end.tz_convert(tz):%Y-%m-%d}")


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError):
        raise ConfigError(f"time zone {tz!r} is unknown; use an IANA name such as Asia/Shanghai or UTC") from None


def analyse_week(cfg: Config, w: Week) -> Analysis:
    """The week's summary and outages; its `span` is None when it holds no measurement."""
    return analyse_config(cfg, w.start.to_pydatetime(), w.end.to_pydatetime())


def measured_weeks(cfg: Config, tz: str) -> list[str]:
    """The weeks the store holds measurements in, as runs of consecutive weeks ("2018-W09" or
    "2018-W09 to 2019-W08"), from the coverage of its summaries and raw rows."""
    coverage = load_summary(source(cfg), None, None, cfg.probe.interval_s).coverage
    mondays: set[date] = set()
    for start, end in zip(coverage["start"], coverage["end"], strict=True):
        first = start.tz_convert(tz).date()
        last = (end - pd.Timedelta(microseconds=1)).tz_convert(tz).date()
        monday = first - timedelta(days=first.weekday())
        while monday <= last:
            mondays.add(monday)
            monday += timedelta(days=7)
    runs: list[list[date]] = []
    for monday in sorted(mondays):
        if runs and monday - runs[-1][-1] == timedelta(days=7):
            runs[-1].append(monday)
        else:
            runs.append([monday])
    return [_label(run[0]) if len(run) == 1 else f"{_label(run[0])} to {_label(run[-1])}" for run in runs]


def _clip(outages: pd.DataFrame, w: Week) -> pd.DataFrame:
    if outages.empty:
        return outages
    inside = outages[(outages["start"] < w.end) & (outages["end"] > w.start)].copy()
    inside["start"] = inside["start"].mask(inside["start"] < w.start, w.start)
    inside["end"] = inside["end"].mask(inside["end"] > w.end, w.end)
    inside["minutes"] = (inside["end"] - inside["start"]).dt.total_seconds() / 60
    return inside


def _within(result: Analysis, w: Week) -> Analysis:
    """The part of a wider analysis that falls in the week (outages clipped to the week)."""
    return Analysis(result.summary.clip(w.start, w.end), _clip(result.pairs, w), _clip(result.paths, w))


def summary_charts(w: Week, summary: Summary, step: pd.Timedelta = HOUR) -> dict[str, Chart]:
    """The availability heatmap and the latency chart: they need the summary alone, not the
    outages (the dashboard draws them while it finds those); with a `step` longer than an
    hour, drawn per step (charts.coarser): a year is drawn by day."""
    hourly, latency = (
        (summary.hourly, summary.latency) if step == HOUR else coarser(summary.hourly, summary.latency, w.start, step)
    )
    return {
        "availability": partial(availability_heatmap, hourly, w.start, w.end, w.tz, step),
        "latency": partial(latency_smoke, latency, hourly, w.start, w.end, w.tz, step=step),
    }


def outage_chart(cfg: Config, w: Week, events: list[Event], result: Analysis) -> Chart:
    s = result.summary
    paths = sorted(s.hourly["path"].astype(str).unique()) if len(s.hourly) else [p.name for p in cfg.paths]
    return partial(outage_timeline, _clip(result.paths, w), s.gaps(w.start, w.end), events, paths, w.start, w.end, w.tz)


def weekly_figures(
    cfg: Config, w: Week, events: list[Event], result: Analysis | None = None, step: pd.Timedelta = HOUR
) -> dict[str, Figure]:
    """The weekly charts: availability, latency (`summary_charts`) and the outage timeline."""
    result = result or analyse_week(cfg, w)
    charts = {**summary_charts(w, result.summary, step), "outages": outage_chart(cfg, w, events, result)}
    return {name: chart() for name, chart in charts.items()}


def save_figures(figures: dict[str, Figure], out: Path, label: str, fmt: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = out / f"{name}-{label}.{fmt}"
        figure.savefig(path, format=fmt)
        written.append(path)
    return written


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _availability(hourly: pd.DataFrame) -> pd.Series:
    if hourly.empty:
        return pd.Series(dtype=float)
    sums = hourly.groupby("path")[["probes", "failing"]].sum()
    return (1 - sums["failing"] / sums["probes"]) * 100


def _minutes(outages: pd.DataFrame) -> pd.Series:
    real = outages[outages["verdict"] != "degraded"] if len(outages) else outages
    return real.groupby("path")["minutes"].sum() if len(real) else pd.Series(dtype=float)


@dataclass(frozen=True, slots=True)
class WeeklyReport:
    html: str
    markdown: str
    measured: bool  # the week holds a measurement


CONTEXT_WEEKS = 8  # the event check of a weekly report looks at the weeks before it too


def build_report(cfg: Config, w: Week) -> WeeklyReport:
    events = load_events(cfg.analysis.events)
    context = Week(w.start - pd.Timedelta(weeks=CONTEXT_WEEKS), w.end, w.tz, w.label)
    wide = analyse_week(cfg, context)  # one reading of the store serves every part of the report
    this, before = _within(wide, w), _within(wide, w.previous)
    outages = this.paths
    figures = weekly_figures(cfg, w, events, this)
    changes = pd.DataFrame(
        {
            "availability_pct": _availability(this.summary.hourly),
            "previous_pct": _availability(before.summary.hourly),
            "outage_min": _minutes(outages),
            "previous_min": _minutes(before.paths),
        }
    ).fillna({"outage_min": 0, "previous_min": 0})
    checks = _event_checks(wide, w, events)
    title = f"tunnelwatch weekly report {w.label}: {cfg.vantage.name}"
    return WeeklyReport(
        html=_html(title, w, figures, changes, outages, events, checks),
        markdown=_markdown(title, w, changes, outages, events, checks),
        measured=this.span is not None,
    )


def _event_checks(wide: Analysis, w: Week, events: list[Event]) -> list[Check]:
    near = [
        e
        for e in events
        if e.category != "holiday"
        and e.window[0] < w.end + pd.Timedelta(days=7)
        and e.window[1] > w.start - pd.Timedelta(days=7)
    ]
    if not near or wide.span is None:
        return []
    outages = wide.paths[wide.paths["verdict"] != "degraded"]
    series = outage_series(outages, wide.summary.coverage, *wide.span)
    return check_events(
        series, near, events, first_outages=outages["start"] if len(outages) else None, method=REPORT_METHOD
    )


def period(w: Week) -> str:
    """The days of the week (or span) in its time zone; with the times where one does not
    begin or end at midnight, as the current week so far."""
    first, end = w.start.tz_convert(w.tz), w.end.tz_convert(w.tz)
    if first == first.normalize() and end == end.normalize():
        return f"{first:%a %Y-%m-%d} to {end - pd.Timedelta(seconds=1):%a %Y-%m-%d} ({w.tz})"
    return f"{first:%a %Y-%m-%d %H:%M} to {end:%a %Y-%m-%d %H:%M} ({w.tz})"


def _local(t: pd.Timestamp, tz: str) -> str:
    return f"{t.tz_convert(tz):%a %m-%d %H:%M}"


def _outage_rows(outages: pd.DataFrame, events: list[Event], tz: str) -> list[list[str]]:
    rows = []
    for o in outages.sort_values("start").to_dict("records") if len(outages) else []:
        rows.append(
            [
                str(o["path"]),
                _local(o["start"], tz),
                _local(o["end"], tz),
                f"{o['minutes']:.0f}",
                str(o["verdict"]),
                ", ".join(o["targets"]),
                ", ".join(overlapping(o["start"], o["end"], events)),
            ]
        )
    return rows


def _number(value: float, unit: str) -> str:
    return "" if pd.isna(value) else f"{value:.1f}{unit}"


def _change_rows(changes: pd.DataFrame) -> list[list[str]]:
    return [
        [
            str(path),
            _number(r["availability_pct"], " %"),
            _number(r["previous_pct"], " %"),
            _number(r["availability_pct"] - r["previous_pct"], " pt"),
            _number(r["outage_min"], ""),
            _number(r["previous_min"], ""),
        ]
        for path, r in changes.iterrows()
    ]


def _check_rows(checks: list[Check]) -> list[list[str]]:
    return [
        [
            c.event,
            c.title,
            f"{c.coverage:.0%}",
            "" if c.ratio is None else f"{c.ratio:.2f}",
            "" if c.p_value is None else f"{c.p_value:.3f}",
            c.verdict,
        ]
        for c in checks
    ]


OUTAGE_HEAD = ["path", "start", "end", "minutes", "verdict", "targets", "events"]
CHANGE_HEAD = ["path", "availability", "previous week", "change", "outage minutes", "previous week"]
CHECK_HEAD = ["event", "title", "measured", "ratio", "p", "verdict"]


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class='empty'>{html.escape(empty)}</p>"
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1320px;color:#222}
img{width:100%;max-width:1280px;display:block;margin:1em 0}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f0f0f0}
.empty{color:#666;font-style:italic}"""


def _html(
    title: str,
    w: Week,
    figures: dict[str, Figure],
    changes: pd.DataFrame,
    outages: pd.DataFrame,
    events: list[Event],
    checks: list[Check],
) -> str:
    images = "".join(
        f"<h2>{name.capitalize()}</h2><img alt='{name} chart' src='data:image/png;base64,{_png(figure)}'>"
        for name, figure in figures.items()
    )
    days = period(w)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>
<p>{html.escape(days)}. Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>
<h2>Against the previous week</h2>{_table(CHANGE_HEAD, _change_rows(changes), "no measurements this week")}
<h2>Outages</h2>{_table(OUTAGE_HEAD, _outage_rows(outages, events, w.tz), "no outages this week")}
<h2>Events in or near the week</h2>{_table(CHECK_HEAD, _check_rows(checks), "no event in or near this week")}
{images}</body></html>
"""


MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]|~])")


def _md(text: str) -> str:
    """Text as a Markdown renderer shows it, never as markup: HTML's characters as entities,
    the inline syntax (emphasis, code, links, table pipes) backslash-escaped, one line."""
    return MARKDOWN_INLINE.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _markdown(
    title: str, w: Week, changes: pd.DataFrame, outages: pd.DataFrame, events: list[Event], checks: list[Check]
) -> str:
    def table(head: list[str], rows: list[list[str]], empty: str) -> str:
        if not rows:
            return f"_{empty}_\n"
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(map(_md, row)) + " |" for row in rows]) + "\n"

    return (
        f"# {_md(title)}\n\n{period(w)}\n\n"
        f"## Against the previous week\n\n{table(CHANGE_HEAD, _change_rows(changes), 'no measurements')}\n"
        f"## Outages\n\n{table(OUTAGE_HEAD, _outage_rows(outages, events, w.tz), 'no outages this week')}\n"
        f"## Events in or near the week\n\n{table(CHECK_HEAD, _check_rows(checks), 'none')}"
    )


def write_report(report: WeeklyReport, out: Path) -> tuple[Path, Path]:
    """The report's HTML at `out`, its Markdown summary beside it (.md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.html, encoding="utf-8")
    summary = out.with_suffix(".md")
    summary.write_text(report.markdown, encoding="utf-8")
    return out, summary


def write_weekly(cfg: Config, today: date | None = None) -> tuple[Path, Path]:
    """What the daemon runs every Monday: last week's report and charts into the reports
    directory, keeping the newest `report.keep` weeks."""
    w = week(None, cfg.report.timezone, today)
    directory = cfg.report.directory
    page, summary = write_report(build_report(cfg, w), directory / f"tunnelwatch-{w.label}.html")
    save_figures(weekly_figures(cfg, w, load_events(cfg.analysis.events)), directory / "charts", w.label, "png")
    _prune(directory, cfg.report.keep)
    return page, summary


def _prune(directory: Path, keep: int) -> None:
    weeks = sorted({p.stem.removeprefix("tunnelwatch-") for p in directory.glob("tunnelwatch-*-W*.html")})
    for old in weeks[:-keep]:
        for path in [*directory.glob(f"tunnelwatch-{old}.*"), *(directory / "charts").glob(f"*-{old}.*")]:
            path.unlink(missing_ok=True)
