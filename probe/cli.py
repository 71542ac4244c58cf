"""The command line: `tunnelwatch` and a vantage point's commands (probe, run, status, config
check); the analysis commands live in analysis/ and are loaded when one of them runs.
Argument parsing and output only.

Each command imports what it needs when it runs, so `tunnelwatch --help` starts at once and
no command that needs no DataFrame loads pandas or matplotlib (tests/test_cli.py checks).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from probe.console import LazyGroup, config_option
from probe.errors import ConfigError, StoreError, TunnelwatchError
from probe.logs import counted, setup_logging

if TYPE_CHECKING:
    from rich.table import Table

    from probe.config import Config
    from probe.model import Measurement

# The analysis commands: where each lives, and its short help (its docstring's first sentence).
ANALYSIS = {
    "outages": (
        "analysis.outages_cli:outages",
        "Outage intervals with their verdict, duration and the events they overlap.",
    ),
    "events": ("analysis.cli:events_group", "The event calendar, and whether outages lined up with it."),
    "chart": ("analysis.cli:chart_group", "Charts of the measurements."),
    "report": ("analysis.cli:report_group", "Reports of the measurements."),
    "store": ("analysis.cli:store_group", "Look after the store."),
    "export": ("analysis.ooni.cli:export", "Write the store's measurements as OONI measurements, CSV or Parquet."),
    "import": ("analysis.ooni.cli:import_group", "Read other tools' measurements into a store."),
    "alerts": (
        "probe.alerts_cli:alerts_group",
        "Alerts: outages as the daemon finds them, and the messages it sends about them.",
    ),
    "serve": (
        "analysis.web.serve_cli:serve",
        "Serve the dashboard (Now, History, Outages, Events, Reports; each page also as JSON) from a store, read-only.",
    ),
}


@click.group(name="tunnelwatch", cls=LazyGroup, lazy=ANALYSIS)
def app() -> None:
    """Measure disruptions of the open Internet and of the tunnels used to reach it."""


@app.group(name="config")
def config_app() -> None:
    """Inspect the configuration."""


def _check_names(kind: str, asked: Sequence[str], known: Sequence[str], source: str) -> None:
    unknown = [name for name in asked if name not in known]
    if unknown:
        raise ConfigError(f"{source}: no {kind} named {', '.join(map(repr, unknown))}; valid: {', '.join(known)}")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(measurements: Sequence[Measurement]) -> Table:
    from rich.table import Table
    from rich.text import Text

    from probe.model import PHASES  # here: only `probe` draws the phases (probe.model is 6 ms to load)

    phase_columns = tuple(f"{phase}_ms" for phase in (*PHASES, "total"))
    table = Table(title=f"round {measurements[0].round_id}" if measurements else "no probes")
    for name in ("target", "path", "ok", "failure", "operation"):
        table.add_column(name)
    for name in phase_columns:
        table.add_column(name.removesuffix("_ms").replace("_", " ") + " ms", justify="right")
    for m in measurements:
        table.add_row(  # names and failures as text: a [bracket] in them is never markup
            Text(m.target),
            Text(m.path),
            Text("yes", "green") if m.ok else Text("no", "red"),
            Text(m.failure or ""),
            Text(m.failed_operation or ""),
            *(_ms(getattr(m, column)) for column in phase_columns),
        )
    return table


@app.command()
@click.option("--target", "-t", multiple=True, help="Only this target (repeatable).")
@click.option("--path", "-p", multiple=True, help="Only this path (repeatable).")
@config_option
@click.option("--no-store", is_flag=True, help="Do not write to the store.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per measurement.")
def probe(target: tuple[str, ...], path: tuple[str, ...], config: Path | None, no_store: bool, as_json: bool) -> None:
    """Run one round now: every target through every path. Exit 0 if all succeeded, else 1."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from probe.config import load_config
    from probe.console import out
    from probe.measure.rounds import ProbeContext, path_rows, plan, run_loop, run_round
    from probe.store.sqlite import open_store

    cfg = load_config(config)
    _check_names("target", target or [], [t.name for t in cfg.targets], cfg.source)
    _check_names("path", path or [], [p.name for p in cfg.paths], cfg.source)
    store = None if no_store else open_store(cfg.store.path)
    try:
        with ThreadPoolExecutor(1) as pool:  # the store's full check runs while the round probes
            checked = pool.submit(store.verify) if store is not None else None
            measurements, heartbeat = run_loop(run_round(ProbeContext.build(cfg), plan(cfg, target or [], path or [])))
        if as_json:
            for m in measurements:
                out.print_json(json.dumps(m.to_dict()), indent=None)
        else:
            out.print(_table(measurements))
        if store is not None and checked is not None:
            checked.result()  # a damaged store is refused: the round is shown, not added to it
            store.record_paths(path_rows(cfg))
            store.write(measurements, [heartbeat])
    finally:
        if store is not None:
            store.close()
    sys.exit(0 if all(m.ok for m in measurements) else 1)


def _masked(cfg: Config) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    for path in data["paths"]:
        for key in ("username", "password"):
            if path.get(key) is not None:
                path[key] = "********"
    return data


@config_app.command("check")
@config_option
def config_check(config: Path | None) -> None:
    """Validate the config and print it resolved, secrets masked."""
    import json

    from rich.text import Text

    from probe.config import load_config
    from probe.console import err, out

    cfg = load_config(config)
    counts = f"{counted(len(cfg.targets), 'target')}, {counted(len(cfg.paths), 'path')}"
    err.print(Text.assemble(("ok", "green"), f": {cfg.source}: {counts}"))
    # Highlighting is colour only: without a colour system (not a terminal) it would draw the
    # same bytes, after some 8 ms of matching.
    out.print_json(json.dumps(_masked(cfg)), highlight=out.color_system is not None)


@app.command()
@config_option
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
def run(config: Path | None, log_json: bool) -> None:
    """Run the daemon in the foreground: probe on schedule until SIGTERM or SIGINT."""
    from probe.daemon.daemon import run_daemon

    setup_logging(as_json=log_json)
    sys.exit(run_daemon(config))


def _when(ms: int | None, now: datetime) -> str:
    if ms is None:
        return ""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z ({_age((now - moment).total_seconds())} ago)"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


FAILURES_S = 6 * 3600  # status shows each pair's newest failure in the hours before the newest measurement


@app.command()
@config_option
def status(config: Path | None) -> None:
    """What the store says now: last heartbeat, each path's state, the last failures."""
    from rich.text import Text

    from probe.config import load_config
    from probe.console import out
    from probe.store.latest import read_latest
    from probe.tables import Cell, table

    cfg = load_config(config)
    if not cfg.store.path.exists():
        raise StoreError(f"{cfg.store.path}: no store yet; start the daemon with `tunnelwatch run`")
    # "Now" is every pair's newest measurement within two of its rounds: a round's worth of rows
    # (or two) before the newest, whatever the store's size.
    cycle_s = max([cfg.probe.interval_s, *cfg.probe.group_intervals_s.values()])
    failures_s = max(FAILURES_S, 2 * cycle_s)
    latest = read_latest(cfg.store.path, now_ms=round(2 * cycle_s * 1000), failures_ms=round(failures_s * 1000))
    now = datetime.now(UTC)
    if latest.heartbeat is None:
        out.print("no round stored yet")
        return
    beat = latest.heartbeat
    out.print(f"last heartbeat: {_when(beat['finished_at_ms'], now)}, round {beat['round_id']}")
    if cfg.store.url is not None:
        out.print(_backlog(cfg.store.path, cfg.store.url.get_secret_value(), now))
    paths = table("paths now (newest measurement of each target)", ("path", "state", "targets ok"))
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in latest.pairs:
        by_path.setdefault(row["path"], []).append(row)
    for name, rows in by_path.items():
        ok = sum(r["ok"] for r in rows)
        state = (
            Cell("up", "green") if ok == len(rows) else Cell("down", "red") if ok == 0 else Cell("partial", "yellow")
        )
        paths.add_row(Cell(name), state, Cell(f"{ok}/{len(rows)}"))
    out.print(paths)
    _open_alerts(cfg.store.path, now)
    last_failure = {(r["target"], r["path"]): r for r in latest.failures}
    news = [r for r in latest.pairs if not r["ok"] or (r["target"], r["path"]) in last_failure]
    pairs = table(
        f"targets and paths failing now or in the past {_age(failures_s)}",
        ("target", "group", "path", "now", "last failure", "failure", "operation"),
    )
    for row in news:
        failed = last_failure.get((row["target"], row["path"]), {})
        pairs.add_row(
            Cell(row["target"]),
            Cell(row["grp"]),
            Cell(row["path"]),
            Cell("ok", "green") if row["ok"] else Cell(str(row["failure"]), "red"),
            Cell(_when(failed.get("started_at_ms"), now)),
            Cell(failed.get("failure") or ""),
            Cell(failed.get("failed_operation") or ""),
        )
    if news:
        out.print(pairs)
    if quiet := len(latest.pairs) - len(news):
        which = counted(quiet, "other pair") if news else f"{'all ' if quiet > 1 else ''}{counted(quiet, 'pair')}"
        out.print(f"{which}: ok, no failure in the past {_age(failures_s)}")
    measured = {row["target"] for row in latest.pairs}
    if unmeasured := [target.name for target in cfg.targets if target.name not in measured]:
        out.print(
            Text(
                f"no measurement in the {_age(2 * cycle_s)} before the newest: {', '.join(unmeasured)} "
                "(new to the config, or its rounds overran or stopped)",
                "yellow",
            )
        )


OPEN_ALERTS_SHOWN = 20


def _open_alerts(store: Path, now: datetime) -> None:
    """The open alerts (probe/store/alerts.py): what the daemon has found down and not back yet."""
    from rich.table import Table
    from rich.text import Text

    from probe.alerts_cli import read_alerts
    from probe.console import out

    opened = [a for a in read_alerts(store, 2**62) if a.open]
    if not opened:
        return
    table = Table(title=f"open alerts ({len(opened)})")
    for name in ("path", "target", "verdict", "since", "why"):
        table.add_column(name)
    for a in opened[:OPEN_ALERTS_SHOWN]:
        why = "; ".join(p for p in (",".join(a.rules), a.detail, a.failure) if p)
        table.add_row(Text(a.path), Text(a.target), Text(a.verdict, "red"), _when(a.start_ms, now), Text(why))
    out.print(table)
    if len(opened) > OPEN_ALERTS_SHOWN:
        out.print(f"and {len(opened) - OPEN_ALERTS_SHOWN} more: tunnelwatch alerts list")


def _backlog(spool_path: Path, url: str, now: datetime) -> str:
    """The spool's line in `status`: what the central store at `url` does not have yet."""
    import contextlib

    from rich.markup import escape

    from probe.pgurl import redact
    from probe.store.file import store_error
    from probe.store.spool import Spool

    try:
        with contextlib.closing(sqlite3.connect(spool_path)) as spool:
            queued = Spool(spool).backlog()
    except sqlite3.Error as exc:
        raise store_error(spool_path, exc, "read the spool's backlog") from None
    return (
        f"central store {escape(redact(url))}: {queued.measurements} measurements "
        f"not uploaded yet{f', the oldest from {_when(queued.oldest_ms, now)}' if queued.oldest_ms else ''}"
        f"{f'; {queued.dropped} given up over store.spool_max_rows' if queued.dropped else ''}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    try:
        code = app.main(args=argv, prog_name="tunnelwatch", standalone_mode=False)
    except TunnelwatchError as exc:
        _error(str(exc))
        sys.exit(exc.exit_code)
    except sqlite3.DatabaseError as exc:  # every store read maps its errors: this is the net under them
        from probe.store.file import is_damage

        if not is_damage(exc):
            raise
        _error(f"a store is damaged ({exc})")
        sys.exit(2)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    from rich.text import Text

    from probe.console import err

    err.print(Text.assemble(("error", "red"), f": {message}"))
