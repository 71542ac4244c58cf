"""Weekly charts and report on a realistic week: a tunnel crackdown, DNS poisoning, throttling,
a stopped daemon, inside the 2018 NPC. Asserted on axes, labels, series and colours."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt
from matplotlib.collections import LineCollection, PolyCollection, QuadMesh
from matplotlib.colors import to_hex, to_rgba
from matplotlib.image import imread

from analysis.charts import (
    FAILURE_STEPS,
    VERDICT_COLOURS,
    availability_heatmap,
    latency_smoke,
    outage_timeline,
    path_colours,
)
from analysis.report import week, weekly_figures
from analysis.summary import Summary
from probe.config import load_config
from tests.analysis_data import analysis_config, realistic_week

TUNNELWATCH = [sys.executable, "-m", "probe"]
TZ = "Asia/Shanghai"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("week")
    realistic_week(tmp / "tw.db")
    return analysis_config(tmp, tmp / "tw.db", f'[report]\ndirectory = "{tmp / "reports"}"')


@pytest.fixture(scope="module")
def figures(config: Path) -> dict:
    from analysis.events import load_events

    cfg = load_config(config)
    return weekly_figures(cfg, week("2018-W10", TZ), load_events())


def test_availability_rows_labels_and_the_gap_as_no_data(figures: dict) -> None:
    ax = figures["availability"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{g} · {p}" for g in ("blocked", "control") for p in ("direct", "vpn", "wg")]
    assert "Mon 2018-03-05 to Sun 2018-03-11" in ax.get_title()
    assert ax.get_xlabel() == f"time ({TZ})"
    colours = path_colours(["direct", "vpn", "wg"])
    assert [to_hex(t.get_color()) for t in ax.get_yticklabels()][:3] == [
        colours[p].lower() for p in ("direct", "vpn", "wg")
    ]
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    values = mesh.get_array().reshape(6, 168)
    saturday = 5 * 24
    gap = values[:, saturday + 3 : saturday + 9]
    assert np.ma.getmaskarray(gap).all()  # the stopped daemon: no data, not failure
    assert not np.ma.getmaskarray(values[:, saturday + 10 :]).any()
    control_vpn = values[4]
    assert control_vpn[24 + 11 : 24 + 25].max() == 0  # the crackdown: Tuesday 11:00 to Wednesday 01:00
    assert control_vpn[:24].min() > 0.5
    assert any(p.get_hatch() == "///" for p in ax.patches)
    assert figures["availability"].axes[1].get_ylabel().startswith("success rate")


def test_latency_smoke_per_path_with_bands_and_a_coloured_median(figures: dict) -> None:
    fig = figures["latency"]
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in axes] == ["direct", "vpn", "wg"]
    assert all(ax.get_ylabel() == "connect (ms)" for ax in axes)
    direct, vpn = axes[0], axes[1]
    bands = [c for c in direct.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # 10-90 and 25-75 percentiles
    (line,) = [c for c in direct.collections if isinstance(c, LineCollection)]
    allowed = {colour.lower() for _, colour, _ in FAILURE_STEPS}
    assert {to_hex(c) for c in line.get_colors()} <= allowed
    medians = np.concatenate([s[:, 1] for s in line.get_segments()])
    assert medians.max() > 4 * np.median(medians)  # Friday's throttling stands out
    (vpn_line,) = [c for c in vpn.collections if isinstance(c, LineCollection)]
    assert len(vpn_line.get_segments()) < 168 - 20  # no line while the tunnel was down
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "10-90 percentile" in legend and "median, control failures >= 50 %" in legend


def test_outage_timeline_bars_by_verdict_and_event_lanes(figures: dict) -> None:
    ax = figures["outages"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["event: cppcc", "event: npc", "direct", "vpn", "wg"]
    texts = [t.get_text() for t in ax.texts]
    assert any("National People's Congress" in t for t in texts)
    bars = [c for c in ax.collections if isinstance(c, PolyCollection)]
    vpn_row = labels.index("vpn")
    middle = lambda b: (b.get_paths()[0].vertices[:, 1].min() + b.get_paths()[0].vertices[:, 1].max()) / 2  # noqa: E731
    on_vpn = [b for b in bars if abs(middle(b) - vpn_row) < 0.01]
    colours = {to_hex(b.get_facecolor()[0]) for b in on_vpn}
    assert VERDICT_COLOURS["tunnel_down"].lower() in colours
    assert any(b.get_hatch() == "///" for b in on_vpn)  # the stopped daemon
    legend = [t.get_text() for t in figures["outages"].legends[0].get_texts()]
    assert {"blocked", "tunnel down", "local outage", "site down", "degraded", "no data", "event window"} <= set(legend)


def test_an_empty_week_draws_no_data_everywhere() -> None:
    start = pd.Timestamp("2018-03-04 16:00", tz="UTC")
    empty = Summary.empty()
    fig = availability_heatmap(empty.hourly, start, start + pd.Timedelta(days=7), TZ)
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    assert np.ma.getmaskarray(mesh.get_array()).all()
    assert latency_smoke(empty.latency, empty.hourly, start, start + pd.Timedelta(days=7), TZ).axes


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_chart_weekly_writes_every_chart(tmp_path: Path, config: Path, fmt: str) -> None:
    result = subprocess.run(
        [
            *TUNNELWATCH,
            "chart",
            "weekly",
            "--config",
            str(config),
            "--week",
            "2018-W10",
            "--out",
            str(tmp_path),
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in ("availability", "latency", "outages"):
        written = tmp_path / f"{name}-2018-W10.{fmt}"
        assert written.stat().st_size > 10_000
    if fmt == "png":
        image = imread(tmp_path / "availability-2018-W10.png")
        assert image.shape[1] == 1280


def test_bad_week_is_refused(config: Path) -> None:
    result = subprocess.run(
        [*TUNNELWATCH, "chart", "weekly", "--config", str(config), "--week", "2018-10"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "is not an ISO week" in result.stderr


def test_weekly_report_is_self_contained_and_renders_in_chromium(tmp_path: Path, config: Path) -> None:
    out = tmp_path / "report.html"
    result = subprocess.run(
        [*TUNNELWATCH, "report", "weekly", "--config", str(config), "--week", "2018-W10", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert page.count("src='data:image/png;base64,") == 3
    assert "src='http" not in page and "href='http" not in page  # no network fetches
    assert "tunnel_down" in page and "npc-2018" in page and "Against the previous week" in page
    summary = out.with_suffix(".md").read_text()
    assert summary.startswith("# tunnelwatch weekly report 2018-W10") and "| vpn | Tue 03-06 10:00" in summary
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (the README's test command installs it as root)")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,2400",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    image = imread(shot)
    assert image.shape[:2] == (2400, 1400)
    assert image[..., :3].std() > 0.05  # not a blank page: text, tables and charts drew


HOSTILE = "<script>alert(1)</script> *loud* [click](javascript:alert(1)) a|b"


def test_report_writes_imported_titles_as_text(tmp_path: Path, config: Path) -> None:
    """An imported calendar's titles are user text: the Markdown summary shows them as text in
    a Markdown renderer (no HTML, no link, no emphasis, the table intact), as the HTML does."""
    (tmp_path / "hostile.ics").write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:hostile@example\r\n"
        f"SUMMARY:{HOSTILE}\r\nDTSTART;VALUE=DATE:20180307\r\nDTEND;VALUE=DATE:20180308\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    hostile = tmp_path / "hostile.toml"
    hostile.write_text(
        config.read_text().replace("[store]", f'[analysis]\nevents = ["{tmp_path / "hostile.ics"}"]\n[store]')
    )
    out = tmp_path / "report.html"
    result = subprocess.run(
        [*TUNNELWATCH, "report", "weekly", "--config", str(hostile), "--week", "2018-W10", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    summary = out.with_suffix(".md").read_text()
    rendered = MarkdownIt("commonmark").enable("table").render(summary)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; *loud* [click](javascript:alert(1)) a|b" in rendered
    assert "<script" not in rendered and "<a " not in rendered and "<em>" not in rendered
    assert rendered.count("<td>") == rendered.count("</td>") and "<td>a</td>" not in rendered
    page = out.read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_title_with_dollar_signs_draws_as_text() -> None:
    """Matplotlib reads text between two $ as mathtext; a title is not, and a malformed one
    must not fail the chart (and so the weekly report)."""
    from analysis.events import Event

    start = pd.Timestamp("2018-03-04 16:00", tz="UTC")
    event = Event(
        id="price", title="VPN prices $x^$ up", category="other", start=date(2018, 3, 6), end=date(2018, 3, 6)
    )
    nothing = pd.DataFrame(columns=["path", "start", "end", "verdict"])
    fig = outage_timeline(nothing, nothing, [event], ["direct"], start, start + pd.Timedelta(days=7), TZ)
    fig.savefig(io.BytesIO(), format="png")
    assert "VPN prices $x^$ up" in [t.get_text() for t in fig.axes[0].texts]


def test_the_weekly_job_writes_last_week_and_keeps_the_newest(config: Path) -> None:
    from datetime import date

    from analysis.report import write_weekly

    cfg = load_config(config)
    directory = cfg.report.directory
    directory.mkdir(parents=True, exist_ok=True)
    for old in ("2017-W50", "2017-W51"):
        (directory / f"tunnelwatch-{old}.html").write_text("old")
        (directory / f"tunnelwatch-{old}.md").write_text("old")
    cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"keep": 2})})
    page, summary = write_weekly(cfg, today=date(2018, 3, 13))  # a Tuesday: last week is 2018-W10
    assert page.name == "tunnelwatch-2018-W10.html" and summary.exists()
    assert sorted(p.name for p in (directory / "charts").iterdir()) == [
        "availability-2018-W10.png",
        "latency-2018-W10.png",
        "outages-2018-W10.png",
    ]
    assert sorted(p.name for p in directory.glob("*.html")) == [
        "tunnelwatch-2017-W51.html",
        "tunnelwatch-2018-W10.html",
    ]
    assert not (directory / "tunnelwatch-2017-W50.md").exists()


def test_the_scheduled_report_of_a_week_without_data_still_renders(config: Path) -> None:
    """What the daemon runs on Mondays, as the daemon runs it: a child process. Last week has
    no data in this store (it holds 2018), which must read as such, not fail."""
    result = subprocess.run(
        [*TUNNELWATCH, "report", "weekly", "--scheduled", "--config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    written = result.stderr.split("wrote ")[1].split(" and ")[0]
    page = Path(written).read_text()
    assert "no measurements this week" in page and "no outages this week" in page
    assert page.count("data:image/png;base64,") == 3


def _synthetic_week(
    paths: list[str], groups: tuple[str, ...]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Hourly counts (one availability row per group and path), latency percentiles, an outage per
    path and one daemon gap."""
    start = pd.Timestamp("2018-03-04 16:00", tz="UTC")
    hours = pd.date_range(start, periods=7 * 24, freq="1h")
    rng = np.random.default_rng(3)
    hourly = pd.DataFrame(
        [(h, g, p, 12, int(rng.integers(0, 4))) for h in hours for g in groups for p in paths],
        columns=["hour", "group", "path", "probes", "failing"],
    )
    median = rng.uniform(20, 200, size=(len(hours) * len(paths), 1))
    latency = pd.DataFrame(
        median * np.array([[0.6, 0.8, 1.0, 1.3, 1.8]]), columns=[f"connect_p{q}" for q in (10, 25, 50, 75, 90)]
    ).assign(hour=np.repeat(hours, len(paths)), path=np.tile(paths, len(hours)), samples=24)
    outages = pd.DataFrame(
        [
            (p, start + pd.Timedelta(hours=10 * i + 5), start + pd.Timedelta(hours=10 * i + 20), "tunnel_down")
            for i, p in enumerate(paths)
        ],
        columns=["path", "start", "end", "verdict"],
    )
    gaps = pd.DataFrame(
        [(start + pd.Timedelta(days=5), start + pd.Timedelta(days=5, hours=6))], columns=["start", "end"]
    )
    return hourly, latency, outages, gaps


LONG = "shadowsocks-hongkong-backup-through-tokyo-relay-02"


@pytest.mark.parametrize(
    ("paths", "groups"),
    [
        ([], ("control",)),
        (["vpn"], ("control",)),
        ([LONG], ("control",)),
        (["direct", "vpn"], ("control",)),
        ([LONG, f"{LONG}-b"], ("control",)),
        ([f"path-{i}" for i in range(12)] + [LONG], ("blocked", "control")),
    ],
    ids=["none", "one", "one-long", "two", "two-long", "many"],
)
@pytest.mark.parametrize("chart", ["availability", "latency", "outages"])
def test_every_chart_keeps_its_ink_inside_the_image(chart: str, paths: list[str], groups: tuple[str, ...]) -> None:
    """Saved as `chart weekly` and the report save them (plain savefig, no bbox_inches), each
    chart's outermost rows and columns of pixels are the background: no legend, label or title is cut."""
    from analysis.events import load_events

    start = pd.Timestamp("2018-03-04 16:00", tz="UTC")
    end = start + pd.Timedelta(days=7)
    hourly, latency, outages, gaps = _synthetic_week(paths, groups)
    if chart == "availability":
        fig = availability_heatmap(hourly, start, end, TZ)
    elif chart == "latency":
        fig = latency_smoke(latency, hourly, start, end, TZ)
    else:
        fig = outage_timeline(outages, gaps, load_events(), paths, start, end, TZ)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    image = imread(buffer, format="png")
    background = np.array(to_rgba(fig.get_facecolor()))
    edges = {"top": image[0], "bottom": image[-1], "left": image[:, 0], "right": image[:, -1]}
    inked = {side: int((~np.isclose(pixels, background).all(axis=1)).sum()) for side, pixels in edges.items()}
    assert inked == dict.fromkeys(edges, 0), f"pixels not background at the edges of {chart}"
    ink = fig.get_tightbbox()  # and nothing drawn wholly outside, where no edge pixel would show it
    assert ink is not None and fig.bbox_inches.contains(ink.x0, ink.y0) and fig.bbox_inches.contains(ink.x1, ink.y1)
