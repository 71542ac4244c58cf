"""Command line: argument parsing and output only."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .config import Config, load_config
from .errors import ConfigError, TunnelwatchError
from .model import Measurement
from .rounds import ProbeContext, plan, run_round
from .store import open_store



@click.group(name="tunnelwatch")
def app() -> None:
    """Measure disruptions of the open Internet and of the tunnels used to reach it."""


@app.group(name="config")
def config_app() -> None:
    """Inspect the configuration."""


out = Console(soft_wrap=True)
if not out.is_terminal:
    out.width = 200
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("tunnelwatch")

config_option = click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Config file (default: the shipped config/tunnelwatch.toml).",
)
PHASE_COLUMNS = ("resolve_ms", "proxy_ms", "connect_ms", "tls_ms", "first_byte_ms", "total_ms")


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
        table.add_row(
            m.target,
            m.path,
            "[green]yes[/]" if m.ok else "[red]no[/]",
            m.failure or "",
            m.failed_operation or "",
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
    measurements, heartbeat = asyncio.run(run_round(ProbeContext.build(cfg), plan(cfg, target or [], path or [])))
    if store is not None:
        store.write(measurements, [heartbeat])
        store.close()
    if as_json:
        for m in measurements:
            out.print_json(json.dumps(m.to_dict()), indent=None)
    else:
        out.print(_table(measurements))
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
    err.print(f"[green]ok[/]: {cfg.source}: {len(cfg.targets)} targets, {len(cfg.paths)} paths")
    out.print_json(json.dumps(_masked(cfg)))


@app.command()
@config_option
def run(config: Path | None) -> None:
    """Probe on the configured interval until SIGTERM or SIGINT (first cut of the daemon)."""
    cfg = load_config(config)
    store = open_store(cfg.store.path)
    asyncio.run(_run_forever(cfg, store))
    store.close()


async def _run_forever(cfg: Config, store: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = ProbeContext.build(cfg)
    pairs = plan(cfg)
    log.info("probing %d pairs every %.0f s into %s", len(pairs), cfg.probe.interval_s, cfg.store.path)
    while not stop.is_set():
        started = loop.time()
        measurements, heartbeat = await run_round(ctx, pairs)
        await asyncio.to_thread(store.write, measurements, [heartbeat])
        failed = [m for m in measurements if not m.ok]
        log.info(
            "round %s: %d/%d ok in %.1f s%s",
            heartbeat.round_id,
            heartbeat.succeeded,
            heartbeat.probes,
            loop.time() - started,
            "; failing: " + ", ".join(f"{m.target}/{m.path}={m.failure}" for m in failed[:8]) if failed else "",
        )
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, cfg.probe.interval_s - (loop.time() - started)))
        except TimeoutError:
            pass
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = app.main(args=argv, prog_name="tunnelwatch", standalone_mode=False)
    except TunnelwatchError as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
