"""Command line: argument parsing and output only."""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from probe.config import Config, load_config, redact
from probe.console import config_option, err, out
from probe.daemon.daemon import run_daemon
from probe.errors import ConfigError, StoreError, TunnelwatchError
from probe.fleet.forwarder import backlog
from probe.logs import setup_logging
from probe.measure.rounds import ProbeContext, path_rows, plan, run_loop, run_round
from probe.model import PHASES, Measurement
from probe.store.file import is_damage
from probe.store.sqlite import open_store, store_error


class LazyGroup(click.Group):
    """Subcommands whose modules load only when asked for: the daemon and the probe never
    import pandas and matplotlib."""

    LAZY = {
        "outages": "analysis.cli:outages",
        "events": "analysis.cli:events_group",
        "chart": "analysis.cli:chart_group",
        "report": "analysis.cli:report_group",
        "store": "analysis.cli:store_group",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attribute = self.LAZY[name].split(":")
            return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]
        return super().get_command(ctx, name)


@click.group(name="tunnelwatch", cls=LazyGroup)
def app() -> None:
    """Measure disruptions of the open Internet and of the tunnels used to reach it."""


@app.group(name="config")
def config_app() -> None:
    """Inspect the configuration."""


PHASE_COLUMNS = tuple(f"{phase}_ms" for phase in (*PHASES, "total"))


def _check_names(kind: str, asked: Sequence[str], known: Sequence[str], source: str) -> None:
    unknown = [name for name in asked if name not in known]
    if unknown:
        raise ConfigError(f"{source}: no {kind} named {', '.join(map(repr, unknown))}; valid: {', '.join(known)}")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(measurements: Sequence[Measurement]) -> Table:
    table = Table(title=f"round {measurements[0].round_id}" if measurements else "no probes")
    for name in ("target", "path", "ok", "failure", "operation"):
        table.add_column(name)
    for name in PHASE_COLUMNS:
        table.add_column(name.removesuffix("_ms").replace("_", " ") + " ms", justify="right")
    for m in measurements:
        table.add_row(  # names and failures as text: a [bracket] in them is never markup
            Text(m.target),
            Text(m.path),
            Text("yes", "green") if m.ok else Text("no", "red"),
            Text(m.failure or ""),
            Text(m.failed_operation or ""),
            *(_ms(getattr(m, column)) for column in PHASE_COLUMNS),
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
    cfg = load_config(config)
    err.print(Text.assemble(("ok", "green"), f": {cfg.source}: {len(cfg.targets)} targets, {len(cfg.paths)} paths"))
    out.print_json(json.dumps(_masked(cfg)))


@app.command()
@config_option
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
def run(config: Path | None, log_json: bool) -> None:
    """Run the daemon in the foreground: probe on schedule until SIGTERM or SIGINT."""
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


@app.command()
@config_option
def status(config: Path | None) -> None:
    """What the store says now: last heartbeat, each path's state, the last failures."""
    cfg = load_config(config)
    if not cfg.store.path.exists():
        raise StoreError(f"{cfg.store.path}: no store yet; start the daemon with `tunnelwatch run`")
    store = open_store(cfg.store.path)
    try:
        beat, latest, failures = store.last_heartbeat(), store.latest_per_pair(), store.latest_per_pair(True)
    finally:
        store.close()
    now = datetime.now(UTC)
    if beat is None:
        out.print("no round stored yet")
        return
    out.print(f"last heartbeat: {_when(beat['finished_at_ms'], now)}, round {beat['round_id']}")
    if cfg.store.url is not None:
        try:
            with contextlib.closing(sqlite3.connect(cfg.store.path)) as spool:
                queued = backlog(spool)
        except sqlite3.Error as exc:
            raise store_error(cfg.store.path, exc, "read the spool's backlog") from None
        out.print(
            f"central store {escape(redact(cfg.store.url.get_secret_value()))}: {queued.measurements} measurements "
            f"not uploaded yet{f', the oldest from {_when(queued.oldest_ms, now)}' if queued.oldest_ms else ''}"
            f"{f'; {queued.dropped} given up over store.spool_max_rows' if queued.dropped else ''}"
        )
    paths = Table(title="paths now (newest measurement of each target)")
    for name in ("path", "state", "targets ok"):
        paths.add_column(name)
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in latest:
        by_path.setdefault(row["path"], []).append(row)
    for name, rows in by_path.items():
        ok = sum(r["ok"] for r in rows)
        state = (
            Text("up", "green") if ok == len(rows) else Text("down", "red") if ok == 0 else Text("partial", "yellow")
        )
        paths.add_row(Text(name), state, f"{ok}/{len(rows)}")
    out.print(paths)
    last_failure = {(r["target"], r["path"]): r for r in failures}
    pairs = Table(title="targets and paths")
    for name in ("target", "group", "path", "now", "last failure", "failure", "operation"):
        pairs.add_column(name)
    for row in latest:
        failed = last_failure.get((row["target"], row["path"]), {})
        pairs.add_row(
            Text(row["target"]),
            Text(row["grp"]),
            Text(row["path"]),
            Text("ok", "green") if row["ok"] else Text(str(row["failure"]), "red"),
            _when(failed.get("started_at_ms"), now),
            Text(failed.get("failure") or ""),
            Text(failed.get("failed_operation") or ""),
        )
    out.print(pairs)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    try:
        code = app.main(args=argv, prog_name="tunnelwatch", standalone_mode=False)
    except TunnelwatchError as exc:
        err.print(Text.assemble(("error", "red"), f": {exc}"))
        sys.exit(exc.exit_code)
    except sqlite3.DatabaseError as exc:  # every store read maps its errors: this is the net under them
        if not is_damage(exc):
            raise
        err.print(Text.assemble(("error", "red"), f": a store is damaged ({exc})"))
        sys.exit(2)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
