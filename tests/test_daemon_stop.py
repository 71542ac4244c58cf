"""The daemon's stop at the moment that made it hang: an alerts evaluation ended (its child
killed by the same SIGTERM, sent to the process group) just as the rounds in flight drained,
so the notifier was woken and cancelled before it ran. On Python 3.11 its
`asyncio.wait_for(wake.wait(), ...)` swallowed that cancel (cpython#86296): the notifier went
on idling 30 s at a time and `tunnelwatch run` never logged "stopped" (the lab's stop() killed
it with SIGKILL 5 s later). The daemon runs in this process (its event loop, uvloop or
asyncio's, and a real SIGTERM); only the moment of the wake-up is placed by the test."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from probe.config import load_config
from probe.daemon.daemon import serve
from probe.daemon.notifier import Notifier
from probe.daemon.probing import Rounds
from tests.conftest import rows, write_config
from tests.servers import LOOPBACK

STOP_S = 5.0  # a stop takes some 50 ms; the margin is for a loaded 2-core machine
LOOPS: dict[str, Callable[[Coroutine[Any, Any, float]], float]] = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("yields", [0, 1, 2])
def test_a_notifier_woken_as_the_rounds_drain_does_not_hold_up_the_stop(
    tmp_path: Path,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    loop: str,
    yields: int,
) -> None:
    body = (
        f'[[targets]]\nname = "t0"\ngroup = "g"\nkind = "tcp"\nhost = "{LOOPBACK}"\nport = {closed_port}\n\n'
        '[[paths]]\nname = "direct"\nkind = "direct"\n'
    )
    path = write_config(tmp_path, body)
    path.write_text(path.read_text().replace("[probe]", "[probe]\ninterval_s = 0.5", 1))
    config = load_config(path)

    notifiers: list[Notifier] = []
    built = Notifier.__init__

    def keep(self: Notifier, *args: Any, **kwargs: Any) -> None:
        built(self, *args, **kwargs)
        notifiers.append(self)

    drained = Rounds.drain

    async def drain_then_wake(self: Rounds, timeout_s: float) -> None:
        await drained(self, timeout_s)
        notifiers[0].wake()  # what an evaluation that has just ended does
        for _ in range(yields):  # the helpers are cancelled this many loop turns later
            await asyncio.sleep(0)

    monkeypatch.setattr(Notifier, "__init__", keep)
    monkeypatch.setattr(Rounds, "drain", drain_then_wake)

    async def scenario() -> float:
        daemon = asyncio.ensure_future(serve(config, path))
        deadline = time.monotonic() + 30
        while not (config.store.path.exists() and len(rows(config.store.path, "heartbeats")) >= 2):
            assert not daemon.done() and time.monotonic() < deadline, "the daemon stored no 2 rounds in 30 s"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # the notifier idles in its wait (up to 30 s) by now
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's handler, not pytest's end
        started = time.monotonic()
        done, _ = await asyncio.wait([daemon], timeout=STOP_S)
        took = time.monotonic() - started
        if not done:  # a hung stop: a second cancel ends it, and the test fails below
            daemon.cancel()
            await asyncio.gather(daemon, return_exceptions=True)
            return took
        assert daemon.result() == 0
        return took

    with caplog.at_level(logging.INFO, "tunnelwatch.daemon"):
        took = LOOPS[loop](scenario())
    assert len(notifiers) == 1
    assert took < STOP_S, f"the daemon took {took:.1f} s to stop: {caplog.text[-2000:]}"
    assert "stopped" in caplog.text
