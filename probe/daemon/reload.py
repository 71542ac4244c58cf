"""SIGHUP: the config read anew and, when it is valid, handed to the daemon to apply.

One reload at a time: the signals that come during one make one more after it, never a
queue. Reading the files and the CA bundle runs in a thread, so a burst of signals never
holds up the rounds. [store] and [metrics] take effect at the next restart only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from probe.config import Config, load_config
from probe.errors import TunnelwatchError
from probe.logs import counted
from probe.measure.rounds import ProbeContext

log = logging.getLogger("tunnelwatch.daemon")
Apply = Callable[[Config, ProbeContext], None]
RESTART_ONLY = ("store", "metrics")  # sections a reload keeps as they were


class Reloader:
    def __init__(self, config_path: Path | None, config: Config, ctx: ProbeContext) -> None:
        self._config_path = config_path
        self._config = config  # the running one
        self._lag = ctx.lag  # one loop, one lag sampler
        self._wanted = asyncio.Event()

    def want(self) -> None:
        """The signal handler: a reload as soon as the one under way (if any) is done."""
        self._wanted.set()

    async def run(self, apply: Apply) -> None:
        """Reload whenever wanted, one at a time. Cancel to stop."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.reload(apply)

    async def reload(self, apply: Apply) -> bool:
        """Read the config file; when it is valid, `apply` it with its probe context. Whether it was."""
        try:
            config = await asyncio.to_thread(load_config, self._config_path)
        except TunnelwatchError as exc:
            log.error("SIGHUP: keeping the running config, the new one is invalid: %s", exc)
            return False
        for key in RESTART_ONLY:
            if getattr(config, key) != getattr(self._config, key):
                log.warning("SIGHUP: [%s] changed; that takes effect at the next restart", key)
        config = config.model_copy(update={key: getattr(self._config, key) for key in RESTART_ONLY})
        try:
            ctx = await asyncio.to_thread(ProbeContext.build, config, self._lag)
        except OSError as exc:  # the CA file went away or changed since it was read
            log.error("SIGHUP: keeping the running config: %s", exc)
            return False
        apply(config, ctx)
        self._config = config
        log.info(
            "SIGHUP: reloaded %s: %s, %s",
            config.source,
            counted(len(config.targets), "target"),
            counted(len(config.paths), "path"),
        )
        return True
