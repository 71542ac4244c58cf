"""`tunnelwatch export` and `tunnelwatch import ooni`. Argument parsing and output only; the
work is in export.py, record.py and importer.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import click

from probe.console import config_option, err

from .. import options

if TYPE_CHECKING:
    import pandas as pd

    from .export import Counts

FORMATS = click.Choice(["ooni", "csv", "parquet"])


def _software_version() -> str:
    try:
        return version("tunnelwatch")
    except PackageNotFoundError:
        return "0+unknown"


def _only(
    chunks: Iterator[pd.DataFrame], targets: tuple[str, ...], paths: tuple[str, ...], counts: Counts
) -> Iterator[pd.DataFrame]:
    """The rows of the targets and paths asked for (all are read: verdicts compare them)."""
    for chunk in chunks:
        if targets:
            chunk = chunk[chunk["target"].isin(targets)]
        if paths:
            chunk = chunk[chunk["path"].isin(paths)]
        if len(chunk):
            counts.written += len(chunk)
            yield chunk


@click.command()
@click.option(
    "--format",
    "fmt",
    type=FORMATS,
    default="ooni",
    show_default=True,
    help="ooni: OONI measurements, one JSON object a line; csv or parquet: the stored rows with their verdicts.",
)
@options.since_until("Rounds from this date or time (UTC unless it has an offset).", "Rounds before this.")
@options.paths_targets("Only this path (repeatable).", "Only this target (repeatable).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The file to write (gzip when it ends in .gz); default: standard output. Parquet needs a file.",
)
@options.store_options
def export(
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    out: Path | None,
    store: str | None,
    vantage: str | None,
    config: Path | None,
) -> None:
    """Write the store's measurements as OONI measurements, CSV or Parquet."""
    from ..frames import Source, read_cursor
    from ..pipeline import source
    from .export import Counts, open_text, windows, write_csv, write_ooni, write_parquet
    from .record import Probe

    options.check_range(since, until)
    if fmt == "parquet" and out is None:
        raise click.BadParameter("Parquet is written to a file: give --out FILE.parquet", param_hint="--out")
    cfg = options.configured(config, store, vantage)
    chosen = source(cfg)
    where = chosen if isinstance(chosen, Source) else Source(chosen)
    counts = Counts()
    chunks = _only(windows(where, since, until, cfg.probe.interval_s, counts=counts), targets, paths, counts)
    if fmt == "parquet":
        assert out is not None
        write_parquet(chunks, out)
    else:
        stream = open_text(out)
        try:
            if fmt == "csv":
                write_csv(chunks, stream)
            else:
                probes = {cfg.vantage.name: Probe.of(cfg.vantage.labels)}
                write_ooni(chunks, stream, probes, _software_version(), counts)
        finally:
            if out is not None:
                stream.close()
            else:
                stream.flush()
    said = f"exported {counts.written:,} measurements from {where}" + (f" to {out}" if out else "")
    if read_cursor(where) is not None and counts.raw_since is not None and (since is None or since < counts.raw_since):
        said += (
            f"; rounds before {counts.raw_since:%Y-%m-%d %H:%M} UTC are kept as summaries only (store compact), "
            "which hold no measurements to export"
        )
    err.print(said)


@click.group(name="import")
def import_group() -> None:
    """Read other tools' measurements into a store."""


@import_group.command("ooni")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--store",
    "store",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The SQLite store to write (default: store.path). A store of their own is best: see the README.",
)
@config_option
def import_ooni(files: tuple[Path, ...], store: Path | None, config: Path | None) -> None:
    """OONI measurements (JSON, JSON lines, .gz, directories of them) into a store, once each."""
    from probe.config import load_config

    from .importer import import_files

    target = store if store is not None else load_config(config).store.path
    result = import_files(list(files), target)
    for problem in result.problems[:50]:
        err.print(problem)
    if len(result.problems) > 50:
        err.print(f"... and {len(result.problems) - 50} more problems")
    err.print(result.summary(target))
    if result.problems:
        raise click.exceptions.Exit(2)
