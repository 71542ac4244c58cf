"""Drawing the History page's charts, as SVG to inline in the page or as PNG, here or in a
process of its own.

Over a year, drawing the three charts is most of the page's work (matplotlib holds the
interpreter while it draws), and two of them, availability and latency, need only the
range's summary: `later` draws those in a child process while this one finds the outages
and draws the outage timeline, so a page takes the longer of the two halves rather than
their sum. One child: the page has two halves to overlap, and a vantage point two cores or
fewer. With one CPU, or if the child dies (the kernel's OOM killer, a signal) or does not
answer within ANSWER_S, the charts are drawn here; a new child is started for the next page,
unless LOSSES children in a row were lost so (one that cannot start, say): then they are
drawn here from then on. The child is a new interpreter (multiprocessing's spawn: never a
fork of this process and its threads; a fork server would hold another 140 MB), runs at this
process' priority (the daemon starts `serve` at nice 10), ignores Ctrl-C, which the terminal
sends to the whole process group, is stopped as the app shuts down (`close`) and exits with
its parent however that ends.
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import matplotlib
from matplotlib.collections import LineCollection, PolyCollection, QuadMesh
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter

from ..charts import Chart

log = logging.getLogger("tunnelwatch.serve")
Drawn = dict[str, str | bytes]
SVG_HEAD = re.compile(r"^.*?(?=<svg)", re.DOTALL)


def dense_as_images(figure: Figure) -> None:
    """The dense artists of the time axes (the heatmap's hours, the latency bands and lines,
    the outage bars) drawn as an image inside the SVG: a chart is one picture rather than
    thousands of vector shapes (a week's heatmap was 250 KiB of them, and most of its writing
    time). The time axes are found by their fixed labels (charts._time_axis)."""
    timed = [ax for ax in figure.axes if isinstance(ax.xaxis.get_major_formatter(), FixedFormatter)]
    for ax in timed:
        for artist in ax.get_children():
            if isinstance(artist, (QuadMesh, LineCollection, PolyCollection)):
                artist.set_rasterized(True)


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


def drawn(charts: dict[str, Chart], fmt: str) -> Drawn:
    """Each chart drawn, as `svg` or `png`."""
    out: Drawn = {}
    for name, chart in charts.items():
        figure = chart()
        dense_as_images(figure)
        out[name] = svg(figure) if fmt == "svg" else png(figure)
    return out


def _child(parent: int) -> None:
    """The drawing child's start: Ctrl-C is the parent's to handle, and the child exits when the
    parent does, however it ends (a killed parent leaves its pool's workers waiting for work
    that never comes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handle: int | None = None
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # a kernel older than Linux 5.3: asked every second instead
        pass

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the parent has exited
        while handle is None and os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="parent", daemon=True).start()


_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()
_losses = 0  # children lost in a row
LOSSES = 3  # lost in a row before the charts are drawn here for good
ANSWER_S = 60.0  # a year's charts take under a second: a child this late is stuck


def _executor() -> ProcessPoolExecutor | None:
    """The child that draws, started with the first page that asks for it; None with one CPU."""
    global _pool
    with _lock:
        if _pool is None and _losses < LOSSES and len(os.sched_getaffinity(0)) > 1:
            context = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(1, mp_context=context, initializer=_child, initargs=(os.getpid(),))
            # shut down as this process exits, its queues let go of: else multiprocessing's
            # resource tracker warns of "leaked semaphore objects" as it stops
            atexit.register(_pool.shutdown)
        return _pool


def _lost(pool: ProcessPoolExecutor, exc: BaseException) -> None:
    global _pool, _losses
    with _lock:
        if _pool is pool:
            _losses += 1
            again = "in a new one next time" if _losses < LOSSES else f"and from now on ({LOSSES} lost)"
            why = str(exc) or f"no answer in {ANSWER_S:g} s"
            log.warning("the process drawing the charts is lost (%s); drawing them here, %s", why, again)
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def later(charts: dict[str, Chart], fmt: str) -> Callable[[], Drawn]:
    """`drawn(charts, fmt)` started in the child; the function returned waits for it (or, with
    no child, draws them then)."""
    pool = _executor()
    future: Future[Drawn] | None = None
    if pool is not None:
        try:
            future = pool.submit(drawn, charts, fmt)
        except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: shut down as the process exits
            _lost(pool, exc)

    def result() -> Drawn:
        global _losses
        if future is not None and pool is not None:
            try:
                answer = future.result(timeout=ANSWER_S)
            except (BrokenProcessPool, TimeoutError) as exc:
                _lost(pool, exc)
            else:
                _losses = 0
                return answer
        return drawn(charts, fmt)

    return result


def close() -> None:
    """The child stopped, as `serve` stops (app.py's lifespan); a later page starts another."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown()


def child_pid() -> int | None:
    """The drawing child's process id (started if need be), None with no child: for the tests."""
    pool = _executor()
    return None if pool is None else pool.submit(os.getpid).result()
