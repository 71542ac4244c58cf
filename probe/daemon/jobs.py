"""The daemon's child jobs: the hourly compaction and the weekly report, each a command of
its own in a child process. Its memory (pandas, matplotlib) goes when it ends; its failure is
logged with the last lines it wrote and never stops probing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("tunnelwatch.daemon")
TUNNELWATCH = (sys.executable, "-m", "probe")
ERROR_LINES = 5  # of a failed child's stderr, in its log line
STOP_S = 5  # a child still running when the daemon stops has this long after SIGTERM


class ChildJobs:
    def __init__(self, config_path: Path | None, command: tuple[str, ...] = TUNNELWATCH) -> None:
        self._config_path = config_path
        self._command = command

    async def weekly_report(self) -> None:
        """Last week's report and charts."""
        await self.run("weekly report", "report", "weekly", "--scheduled")

    async def compact(self) -> None:
        """Summarise the last complete hours and delete raw rows past store.keep_raw_days."""
        await self.run("compaction", "store", "compact")

    async def evaluate_alerts(self) -> None:
        """Judge the latest rounds, save the alerts and queue their messages (after each round: quiet when it works)."""
        await self.run("alerts evaluation", "alerts", "evaluate", quiet=True)

    async def run(self, what: str, *args: str, quiet: bool = False) -> bool:
        """`tunnelwatch ARGS --config FILE`, logged as `what` (at debug level when it succeeded
        and `quiet`); whether it succeeded."""
        command = [*self._command, *args]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, stderr = await child.communicate()
        except asyncio.CancelledError:  # the daemon stops: the child goes with it, reaped
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            try:
                await asyncio.wait_for(child.wait(), STOP_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
            raise
        level, message = outcome(what, child.returncode, stderr)
        log.log(logging.DEBUG if quiet and child.returncode == 0 else level, "%s", message)
        return child.returncode == 0


def outcome(what: str, returncode: int | None, stderr: bytes) -> tuple[int, str]:
    """The log level and line of a child that ended: its last line when it succeeded, its
    last ERROR_LINES lines and exit code when it failed."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    if returncode == 0:
        return logging.INFO, f"{what}: {lines[-1] if lines else 'done'}"
    return logging.ERROR, f"{what} failed (exit {returncode}): {' | '.join(lines[-ERROR_LINES:])}"
