"""Sends the messages analysis/alerts.py queues (probe/store/outbox.py) through Apprise."""

from __future__ import annotations

from probe.config import Config


def send_test(cfg: Config) -> list[tuple[str, bool, str]]:
    """A test message to every alerts.urls destination: (destination, sent, why not)."""
    raise NotImplementedError("the notifier is being written")
