"""`tunnelwatch serve`: the dashboard over any store, read-only, served by uvicorn.
Argument parsing only; the pages are app.py's."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import click

from probe.console import err

from .. import options

log = logging.getLogger("tunnelwatch.serve")


def host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{listen!r} must be host:port, like 127.0.0.1:9465", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.command()
@click.option(
    "--listen",
    default="127.0.0.1:9465",
    show_default=True,
    help="host:port to serve on (a non-loopback address wants metrics.username and metrics.password).",
)
@click.option("--unix", "unix", type=click.Path(path_type=Path), help="Serve on this unix socket instead of --listen.")
@options.store_options
def serve(listen: str, unix: Path | None, store: str | None, vantage: str | None, config: Path | None) -> None:
    """Serve the dashboard (Now, History, Outages, Events, Reports; each page also as JSON) from a store, read-only."""
    import uvicorn

    from probe.config import loopback

    from ..pipeline import store_of
    from .app import GC_THRESHOLD, build_app

    host, port = host_port(listen)
    cfg = options.configured(config, store, vantage)
    username, password = cfg.metrics.username, cfg.metrics.password
    credentials = (username, password.get_secret_value()) if username and password else None
    if unix is None and credentials is None and not loopback(host):
        log.warning(
            "serving the dashboard on %s without a password: anyone who reaches it reads the store; "
            "set metrics.username and metrics.password",
            listen,
        )
    where = f"unix:{unix}" if unix else f"http://{listen}/"
    err.print(f"tunnelwatch serve: {where} ({store_of(cfg)}), read-only")
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    uvicorn.run(
        build_app(cfg, credentials=credentials),
        host=host,
        port=port,
        uds=str(unix) if unix else None,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
