"""The command line's tables: rich tables of text cells, drawn as rich draws them, in less time.

A `rich.table.Table` wraps each cell in a `Padding` of one space each side and lays out a
`Text` in it: some 0.2 ms a cell, most of `events list`'s time (104 rows of 7) and of
`status`'s. A `Cell` in a `table()` (padding 0) is that padded text: it measures as
`Padding(Text(text, style), (0, 1))` measures and draws a line that fits its column
directly; anything else (a line to wrap, a tab, a control character, a justification other
than left) it hands to the `Padding` and `Text` it stands for. Its text is never markup.
tests/test_cli.py checks that tables of cells and of `Text` draw the same, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.segment import Segment
from rich.table import Table
from rich.text import Text, TextType

PAD = 1  # spaces each side of a cell's text: rich.table.Table's default padding, (0, 1)


class Cell:
    """Text in a `table()`: what `Padding(Text(text, style), (0, 1))` is in a `Table`."""

    __slots__ = ("style", "text")

    def __init__(self, text: str, style: str = "") -> None:
        self.text = text
        self.style = style

    def _padded(self) -> Padding:
        return Padding(Text(self.text, self.style), (0, PAD))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        max_width = options.max_width
        text = self.text
        if not text.isprintable() or max_width - 2 * PAD < 1:
            return self._padded().__rich_measure__(console, options)
        # Text.__rich_measure__: the longest word, the line (printable text is one line; in
        # ASCII a character is a cell). Measurement.get bounds it by the width, then
        # Padding adds its sides.
        width = len if text.isascii() else cell_len
        words = text.split()
        line = width(text)
        word = min(max(map(width, words)) if words else line, max_width)
        line = min(line, max_width)
        if line < 1:
            word = line = 0
        return Measurement(min(word + 2 * PAD, max_width), min(line + 2 * PAD, max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width - 2 * PAD  # Padding expands to the column
        text = self.text
        if (
            width < 1
            or options.justify != "left"  # a table column's default
            or options.height is not None
            or not text.isprintable()  # tabs, new lines, control characters
            or text != text.strip()
            or (used := len(text) if text.isascii() else cell_len(text)) > width
        ):
            yield self._padded()
            return
        # One line, padded to the column as Text pads it (in its style), then Padding's sides.
        side = Segment(" " * PAD)
        yield side
        yield Segment(text + " " * (width - used), console.get_style(self.style) if self.style else None)
        yield side
        yield Segment.line()


def table(title: TextType | None, columns: Iterable[str]) -> Table:
    """A table of `Cell` rows under a header of `columns` (plain text): what
    `Table(title=title)` with `add_column(name)` for each draws, when each row is cells."""
    grid = Table(title=title, padding=0)
    for name in columns:
        grid.add_column(Cell(name))
    return grid
