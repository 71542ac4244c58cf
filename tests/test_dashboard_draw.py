"""The History page's charts drawn in a child process (analysis/web/draw.py): the same bytes as
drawn here, drawn here when the child is killed and a new child started for the next page,
and the child gone when its parent is killed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.events import load_events
from analysis.report import analyse_week, outage_chart, summary_charts, week
from analysis.web import draw
from probe.config import load_config
from tests.analysis_data import analysis_config, realistic_week

TZ = "Asia/Shanghai"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("week")
    realistic_week(tmp / "tw.db")
    return analysis_config(tmp, tmp / "tw.db")


@pytest.fixture(scope="module")
def charts(config: Path) -> dict[str, draw.Chart]:
    cfg = load_config(config)
    w = week("2018-W10", TZ)
    result = analyse_week(cfg, w)
    return {**summary_charts(w, result.summary), "outages": outage_chart(cfg, w, load_events(), result)}


def _gone(pid: int, within_s: float) -> bool:
    """Whether the process has exited (a zombie has: its parent may be an init that never reaps)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# what differs between two drawings: names drawn at random (svg.hashsalt unset), the time of drawing
SVG_IDS = re.compile(r'(id="|url\(#|xlink:href="#)[^")]*|<dc:date>[^<]*')


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_charts_drawn_in_the_child_are_those_drawn_here(charts: dict[str, draw.Chart], fmt: str) -> None:
    child = draw.child_pid()
    if len(os.sched_getaffinity(0)) == 1:
        assert child is None  # one CPU: drawn here, nothing to overlap
    else:
        assert child is not None and child != os.getpid()
    there, here = draw.later(charts, fmt)(), draw.drawn(charts, fmt)
    assert list(there) == ["availability", "latency", "outages"]
    if fmt == "png":
        assert there == here
    else:  # the same but for the names matplotlib draws at random
        for name in charts:
            text = there[name]
            assert isinstance(text, str) and text.startswith("<svg") and len(text) > 10_000
            assert SVG_IDS.sub("", text) == SVG_IDS.sub("", str(here[name])), name


def test_a_killed_child_costs_no_page(charts: dict[str, draw.Chart], caplog: pytest.LogCaptureFixture) -> None:
    """The OOM killer or a stray signal takes the drawing child: the page is drawn here, and
    the next page has a new child."""
    first = draw.child_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _gone(first, 10)
    with caplog.at_level(logging.WARNING, logger="tunnelwatch.serve"):
        answer = draw.later(charts, "png")()  # asked of the dead child
    assert answer == draw.drawn(charts, "png")
    assert "the process drawing the charts is lost" in caplog.text
    again = draw.later(charts, "png")()  # a new child
    assert again == answer
    second = draw.child_pid()
    assert second is not None and second != first and second != os.getpid()


def test_a_child_that_does_not_answer_costs_no_page(
    charts: dict[str, draw.Chart], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped (or stuck) child: after draw.ANSWER_S the page is drawn here."""
    monkeypatch.setattr(draw, "ANSWER_S", 2.0)
    child = draw.child_pid()
    assert child is not None
    os.kill(child, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="tunnelwatch.serve"):
            assert draw.later(charts, "png")() == draw.drawn(charts, "png")
        assert "no answer in 2 s" in caplog.text
        assert draw.child_pid() not in (None, child)  # a new one
    finally:
        os.kill(child, signal.SIGKILL)


def test_children_lost_again_and_again_leave_the_drawing_here(
    charts: dict[str, draw.Chart], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that keeps dying (killed at each page, or unable to start) costs each page a new
    one: after draw.LOSSES, the charts are drawn here and no child is started again."""
    monkeypatch.setattr(draw, "_losses", draw.LOSSES - 1)
    child = draw.child_pid()
    assert child is not None
    os.kill(child, signal.SIGKILL)
    assert _gone(child, 10)
    with caplog.at_level(logging.WARNING, logger="tunnelwatch.serve"):
        assert draw.later(charts, "png")() == draw.drawn(charts, "png")
    assert f"from now on ({draw.LOSSES} lost)" in caplog.text
    assert draw.child_pid() is None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_the_child_exits_with_its_parent(tmp_path: Path) -> None:
    """A killed `serve` (SIGKILL leaves it no time to stop its pool) leaves no drawing child,
    nor multiprocessing's resource tracker, behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from analysis.web import draw\n"
        "if __name__ == '__main__':\n"
        "    print(draw.child_pid(), flush=True)\n"
        "    time.sleep(600)\n"
    )
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the resource tracker's complaint as the killed parent's pool goes
        text=True,
        cwd=Path(__file__).parent.parent,
    ) as parent:
        try:
            assert parent.stdout is not None
            assert select.select([parent.stdout], [], [], 120)[0], "the parent did not start its child"
            child = int(parent.stdout.readline())
            helpers = _children(parent.pid)
            assert child in helpers and not _gone(child, 0.5)
        finally:
            parent.kill()
    for pid in helpers:
        assert _gone(pid, 20), f"{Path(f'/proc/{pid}/cmdline').read_bytes()!r} outlived its parent"


def test_serve_stopped_by_sigterm_stops_its_child_quietly(config: Path, tmp_path: Path) -> None:
    """The daemon stops `serve` with SIGTERM: uvicorn shuts the app down, then ends the process
    by the signal again, so nothing registered with atexit runs. The child is stopped by the
    app's shutdown, and nothing complains on the way out (multiprocessing's resource tracker
    warned of leaked semaphores when the pool was left to atexit)."""
    sock = tmp_path / "serve.sock"
    command = [sys.executable, "-m", "probe", "serve", "--unix", str(sock), "--config", str(config)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as serve:
        try:
            deadline = time.monotonic() + 120
            while not sock.exists():
                assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
            query = "since=2018-03-05T00:00:00%2B00:00&until=2018-03-12T00:00:00%2B00:00"
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(120)
                client.connect(str(sock))
                client.sendall(f"GET /history?{query} HTTP/1.0\r\nHost: serve\r\n\r\n".encode())
                page = b"".join(iter(lambda: client.recv(65536), b"")).decode()
            assert page.startswith("HTTP/1.1 200")
            assert page.count("<svg") >= 3
            helpers = _children(serve.pid)
            assert helpers, "no drawing child"
        finally:
            serve.terminate()
        _, err = serve.communicate(timeout=60)
    assert serve.returncode == -signal.SIGTERM
    for pid in helpers:
        assert _gone(pid, 20), f"{pid} outlived serve"
    assert "leaked" not in err and "Traceback" not in err, err
