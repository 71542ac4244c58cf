"""Our own error tree. Each error carries the CLI exit code it maps to."""

from __future__ import annotations


class TunnelwatchError(Exception):
    exit_code = 1


class ConfigError(TunnelwatchError):
    """Bad input: names the file, the key, the bad value and what would be valid."""

    exit_code = 2


class StoreError(TunnelwatchError):
    exit_code = 2


class ProbeFailure(Exception):
    """A network failure the probe code itself detected (a SOCKS reply, a bad redirect).

    Carries the OONI-style failure string and the operation it happened in, so the
    classifier needs no guessing.
    """

    def __init__(self, failure: str, operation: str, detail: str = "") -> None:
        super().__init__(detail or failure)
        self.failure = failure
        self.operation = operation
