"""`tunnelwatch alerts`: judge the latest rounds (what the daemon runs after each round),
list the alerts the store holds, and send a test message to every destination.
Argument parsing and output only: analysis/alerts.py judges, probe/daemon/notifier.py sends."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from probe.console import config_option
from probe.errors import StoreError

if TYPE_CHECKING:
    from probe.store.alerts import Alert


@click.group(name="alerts")
def alerts_group() -> None:
    """Alerts: outages as the daemon finds them, and the messages it sends about them."""


@alerts_group.command("evaluate")
@config_option
@click.option(
    "--now",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="Judge the rounds up to this UTC time (default: now).",
)
def evaluate_command(config: Path | None, now: datetime | None) -> None:
    """Judge the latest rounds, save the alerts and queue the messages (the daemon runs this after each round)."""
    from analysis.alerts import evaluate
    from probe.config import load_config
    from probe.logs import counted

    cfg = load_config(config)
    if not cfg.store.path.exists():
        raise StoreError(f"{cfg.store.path}: no store yet; start the daemon with `tunnelwatch run`")
    changes = evaluate(cfg, now.replace(tzinfo=UTC) if now else datetime.now(UTC))
    click.echo(f"alerts: {counted(len(changes), 'change')}", err=True)


@alerts_group.command("list")
@config_option
@click.option(
    "--days", type=click.FloatRange(min=0), default=7.0, show_default=True, help="Alerts that ended this recently."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per alert.")
def list_command(config: Path | None, days: float, as_json: bool) -> None:
    """Open alerts and those of the last days."""
    import json

    from rich.table import Table
    from rich.text import Text

    from probe.config import load_config
    from probe.console import out

    cfg = load_config(config)
    now = datetime.now(UTC)
    alerts = read_alerts(cfg.store.path, round((now.timestamp() - days * 86400) * 1000))
    if as_json:
        for a in alerts:
            fields = {f: getattr(a, f) for f in ("path", "target", "grp", "verdict", "blocking", "failure", "detail")}
            times = {"start": _iso(a.start_ms), "end": _iso(a.end_ms) if a.end_ms is not None else None}
            out.print_json(json.dumps({**fields, "rules": list(a.rules), **times, "told": a.announced}), indent=None)
        return
    table = Table(title=f"alerts open or ended in the last {days:g} days")
    for name in ("path", "target", "verdict", "since (UTC)", "until (UTC)", "told", "why"):
        table.add_column(name)
    for a in alerts:
        table.add_row(
            Text(a.path),
            Text(a.target),
            Text(a.verdict, "red" if a.open else ""),
            _utc(a.start_ms),
            Text("open", "red") if a.end_ms is None else Text(_utc(a.end_ms)),
            a.announced or "no",
            Text("; ".join(p for p in (",".join(a.rules), a.detail, a.failure) if p)),
        )
    out.print(table if alerts else "no alerts")


@alerts_group.command("test")
@config_option
def test_command(config: Path | None) -> None:
    """Send a test message to every alerts.urls destination; say which failed and why. Exit 1 if one failed."""
    import sys

    from rich.text import Text

    from probe.config import load_config
    from probe.console import out
    from probe.daemon.notifier import send_test

    cfg = load_config(config)
    if not cfg.alerts.urls:
        raise click.UsageError(f"{cfg.source}: alerts.urls is empty; nothing to test")
    results = send_test(cfg)
    for destination, ok, reason in results:
        out.print(
            Text.assemble(
                (("sent", "green") if ok else ("failed", "red")), f"  {destination}", f": {reason}" if reason else ""
            )
        )
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


def read_alerts(path: Path, since_ms: int) -> list[Alert]:
    """The store's alerts open or ended since since_ms (none if it has no store or no alerts yet)."""
    from probe.store.alerts import recent_alerts
    from probe.store.file import store_error

    if not path.exists():
        raise StoreError(f"{path}: no store yet; start the daemon with `tunnelwatch run`")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alerts'").fetchone():
                return []
            return recent_alerts(db, since_ms)
    except sqlite3.Error as exc:
        raise store_error(path, exc, "read the alerts") from None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _utc(ms: int) -> str:
    return f"{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d %H:%M}"
