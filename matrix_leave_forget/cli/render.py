"""Output: tables for people, CSV and JSON for scripts, progress on a terminal."""

import csv
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import attr

from matrix_leave_forget.cli.errors import PROG
from matrix_leave_forget.timestamps import iso8601

# Terminal control characters and bidi overrides in user-supplied text (a
# leave reason) could rewrite or disguise what the table shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """text with control characters and bidi overrides shown as escapes."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def format_ts(ms: Any) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, which ``--since`` also accepts.

    Args:
        ms: Milliseconds since the epoch, or None.

    Returns:
        For example ``2024-05-01T12:00:00.000Z``, or ``-`` for None.
    """
    return iso8601(ms)


def _text(value: Any) -> str:
    """A table cell: ``-`` for nothing, else the value made safe for a terminal."""
    return "-" if value is None or value == "" else _printable(str(value))


@attr.s(frozen=True, auto_attribs=True)
class Column:
    """One column of a table.

    Attributes:
        key: The field it shows.
        header: Its heading.
        render: How a value reads in the table (JSON and CSV keep raw values).
    """

    key: str
    header: str
    render: Callable[[Any], str] = _text


def table_widths(
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    minimum: Mapping[str, int] | None = None,
) -> list[int]:
    """Each column's width for the headings and ``rows``, at least ``minimum[key]``."""
    widths = [max(len(c.header), (minimum or {}).get(c.key, 0)) for c in columns]
    for row in rows:
        for i, c in enumerate(columns):
            widths[i] = max(widths[i], len(c.render(row.get(c.key))))
    return widths


def render_table(
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    header: bool = True,
    widths: Sequence[int] | None = None,
) -> str:
    """An aligned plain-text table, one row per line.

    Every column is always shown, an empty cell as ``-``, so that scripts
    reading columns by position (awk, cut) and people comparing two runs see
    the same columns whatever the rows hold.

    Args:
        columns: The columns, in order.
        rows: The rows, as mappings from column key to raw value.
        header: Whether to start with the headings (``log --follow`` prints
            later rows without them).
        widths: Fixed column widths (``log --follow``: the first table's, so
            that later rows line up with its headings); a longer cell only
            shifts the rest of its own line. By default, the widest cell's.

    Returns:
        The table, without a trailing newline.
    """
    cells = ([[c.header for c in columns]] if header else []) + [
        [c.render(row.get(c.key)) for c in columns] for row in rows
    ]
    if widths is None:
        widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def csv_value(value: Any) -> Any:
    """A raw value as a CSV cell: nested values as JSON, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        # As JSON spells them, not Python's True/False.
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def write_csv(out: IO[str], keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write a header of ``keys`` and one CSV line per row to ``out``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        writer.writerow([csv_value(row.get(k)) for k in keys])


def write_json(out: IO[str], value: Any) -> None:
    """Write value as indented JSON with sorted keys, newline-terminated."""
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def warn(message: str) -> None:
    """A note for the operator on stderr, kept out of the machine-readable stdout."""
    print(f"{PROG}: {message}", file=sys.stderr)


class Progress:
    """A one-line progress indicator on stderr, drawn only when a person is watching.

    Scripts and pipes must get clean output, so nothing is written unless
    stderr is a terminal.

    Args:
        label: What is being done.
        total: The highest seq there is, or 0 if unknown.
        stream: Where to draw (stderr).
    """

    # Redrawing on every row would cost more than the work on a fast disk.
    INTERVAL = 0.1

    def __init__(self, label: str, total: int, stream: IO[str]) -> None:
        self._label = label
        self._total = total
        self._stream = stream
        self._last = 0.0
        self._drawn = False

    @staticmethod
    def wanted(stream: IO[str]) -> bool:
        """Whether stream is a terminal (so a person, not a script, reads it)."""
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def update(self, count: int, seq: int) -> None:
        """Show progress, redrawn at most every INTERVAL seconds.

        Args:
            count: Entries done so far.
            seq: The latest entry's seq, measured against ``total``.
        """
        now = time.monotonic()
        if now - self._last < self.INTERVAL:
            return
        self._last = now
        line = f"{self._label}: {count} {'entry' if count == 1 else 'entries'}"
        if self._total:
            fraction = min(max(seq / self._total, 0.0), 1.0)
            filled = int(fraction * 30)
            line += f" [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}"
        self._stream.write("\r" + line)
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """Erase the line so that the final report starts on a clean one."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def write_listing(
    out_format: str,
    json_value: Any,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    empty: str,
) -> None:
    """A listing on stdout: ``json_value`` as JSON, the rows as CSV, or a table (``empty``
    when there are no rows)."""
    if out_format == "json":
        write_json(sys.stdout, json_value)
    elif out_format == "csv":
        write_csv(sys.stdout, [c.key for c in columns], rows)
    elif rows:
        print(render_table(columns, rows))
    else:
        print(empty)
