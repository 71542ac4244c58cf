"""What the daemon does while something it writes to is failing (its store, the fleet's
central store): try again after a wait that doubles, up to five minutes, and log the outage
once when it begins and once when it ends, with how long it lasted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MAX_WAIT_S = 300.0


async def retry(attempt: Callable[[], Awaitable[bool]], first_wait_s: float, max_wait_s: float = MAX_WAIT_S) -> None:
    """Call `attempt` until it returns True: `first_wait_s` after its first failure, then
    twice as long after each further one, never longer than `max_wait_s`."""
    wait = first_wait_s
    while not await attempt():
        await asyncio.sleep(wait)
        wait = min(wait * 2, max_wait_s)


class Outage:
    """When the failures in a row began: the first failure and the first success after
    them are the two moments worth a log line."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the first failure

    def failed(self) -> bool:
        """A failure; True when it begins the outage."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        return True

    def recovered(self) -> float | None:
        """A success; how long the outage it ends lasted (s), or None when there was none."""
        if self.since is None:
            return None
        lasted, self.since = time.monotonic() - self.since, None
        return lasted
