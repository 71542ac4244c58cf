"""The event calendar: the shipped config/events.toml, users' own TOML files, iCalendar imports.

Dates are Beijing local dates: a date covers 00:00-24:00 Asia/Shanghai, the end date
included. A start or end with a time and an offset is taken as it is.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, get_args
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from probe.errors import ConfigError

if TYPE_CHECKING:  # loaded when used: listing the calendar needs neither
    import icalendar
    import pandas as pd

BEIJING = ZoneInfo("Asia/Shanghai")
Category = Literal["npc", "cppcc", "party-congress", "policy", "blocking-wave", "anniversary", "holiday", "other"]
CATEGORIES: tuple[Category, ...] = get_args(Category)
Confidence = Literal["confirmed", "reported", "approximate"]
TOML_EVENTS_TABLE = re.compile(r"^\s*\[\[\s*events\s*\]\]")
ICS_NAME = re.compile(r"[A-Za-z0-9-]*")
ICS_DATES = {  # the properties an event's time is read from: what they hold, and an example
    "DTSTART": ((date,), "a date (DTSTART;VALUE=DATE:20240715) or a date-time (DTSTART:20240715T100000Z)"),
    "DTEND": ((date,), "a date (DTEND;VALUE=DATE:20240716) or a date-time (DTEND:20240715T120000Z)"),
    "DURATION": ((timedelta,), "a duration such as P1D, P2W or PT3H"),
}


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$", max_length=200)
    title: str = Field(min_length=1)
    category: Category
    start: datetime | date
    end: datetime | date
    confidence: Confidence = "reported"
    source: str = ""
    origin: str = Field("", exclude=True)  # the file it came from

    @model_validator(mode="after")
    def _ordered(self) -> Event:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, datetime) and value.tzinfo is None:
                raise ValueError(f"{name} {value.isoformat()} has a time but no offset; write e.g. +08:00")
        if self.span[1] <= self.span[0]:
            raise ValueError(f"end {self.end} is not after start {self.start}")
        return self

    @property
    def span(self) -> tuple[datetime, datetime]:
        """[start, end) in UTC."""
        return _instant(self.start, end=False), _instant(self.end, end=True)

    @property
    def window(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """[start, end) in UTC, as pandas timestamps."""
        return _window(self.start, self.end)


def overlapping(start: pd.Timestamp, end: pd.Timestamp, events: Iterable[Event]) -> tuple[str, ...]:
    """The ids of the events whose window overlaps [start, end), in their order."""
    import pandas as pd

    lo, hi = pd.Timestamp(start).value, pd.Timestamp(end).value  # nanoseconds: a year's rows ask often
    return tuple(e.id for e in events if (w := _window_ns(e.start, e.end))[0] < hi and lo < w[1])


def overlapping_each(starts: pd.Series, ends: pd.Series, events: Sequence[Event]) -> list[tuple[str, ...]]:
    """`overlapping` for each [start, end) of two columns at once: a year's outages ask the
    whole calendar, one comparison of every outage with every event."""
    import numpy as np

    if not events:
        return [()] * len(starts)
    windows = np.array([_window_ns(e.start, e.end) for e in events], dtype="int64")
    lo = starts.astype("datetime64[ns, UTC]").astype("int64").to_numpy()[:, None]
    hi = ends.astype("datetime64[ns, UTC]").astype("int64").to_numpy()[:, None]
    hits = (windows[:, 0] < hi) & (lo < windows[:, 1])
    ids = np.array([e.id for e in events], dtype=object)
    return [tuple(ids[row]) for row in hits]


@functools.lru_cache(maxsize=4096)
def _window_ns(start: datetime | date, end: datetime | date) -> tuple[int, int]:
    a, b = _window(start, end)
    return a.value, b.value


@functools.lru_cache(maxsize=4096)
def _window(start: datetime | date, end: datetime | date) -> tuple[pd.Timestamp, pd.Timestamp]:
    """An event's window, made once: a year's outages ask each event's window for each outage."""
    import pandas as pd

    return (
        pd.Timestamp(_instant(start, end=False)).tz_convert("UTC"),
        pd.Timestamp(_instant(end, end=True)).tz_convert("UTC"),
    )


def _instant(value: datetime | date, end: bool) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    day = value + timedelta(days=1) if end else value
    return datetime.combine(day, time(0), tzinfo=BEIJING).astimezone(UTC)


def shipped_events_path() -> Path:
    return Path(str(resources.files("tunnelwatch_config").joinpath("events.toml")))


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "date", "datetime")))


def _from_toml(path: Path, data: bytes) -> list[Event]:
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid events file: {exc}") from None
    items = raw.get("events")
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected [[events]] tables, found keys {sorted(raw)}")
    tables = [n + 1 for n, line in enumerate(text.splitlines()) if TOML_EVENTS_TABLE.match(line)]
    events = []
    for index, item in enumerate(items):
        where = f"events[{index}]" + (f" (line {tables[index]})" if len(tables) == len(items) else "")
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: {where}: expected a table of id, title, category, start, end, got {item!r}")
        try:
            events.append(Event.model_validate({**item, "origin": str(path)}))
        except ValidationError as exc:
            where += f" (id {item.get('id')!r})" if "id" in item else ""
            problems = "; ".join(
                f"{_key(e['loc']) or 'event'}: {e['msg'].removeprefix('Value error, ')}"
                + ("" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})")
                for e in exc.errors(include_url=False)
            )
            raise ConfigError(f"{path}: {where}: {problems}") from None
    return events


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-") or "event"


def _vevent_lines(text: str) -> list[dict[str, tuple[int, str]]]:
    """For each VEVENT in the order of the file: its properties' first line number and raw
    value, and BEGIN's line. icalendar keeps no line numbers; its messages need them."""
    events: list[dict[str, tuple[int, str]]] = []
    stack: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or line[0] in " \t":  # empty, or a folded continuation
            continue
        name, value = _content_line(line)
        if name == "BEGIN":
            stack.append(value.strip().upper())
            if stack[-1] == "VEVENT":
                events.append({"BEGIN": (number, value)})
        elif name == "END":
            stack = stack[:-1]
        elif stack and stack[-1] == "VEVENT":
            events[-1].setdefault(name, (number, value))
    return events


def _content_line(line: str) -> tuple[str, str]:
    """NAME;PARAM="a:b":value -> (NAME, value): the value starts after the first colon
    outside quotes."""
    name = ICS_NAME.match(line).group(0).upper()  # type: ignore[union-attr]
    quoted = False
    for at, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            return name, line[at + 1 :]
    return name, ""


def _ics_time(
    item: icalendar.cal.Component, name: str, where: Callable[[int], str], lines: dict[str, tuple[int, str]]
) -> Any:
    """DTSTART, DTEND or DURATION's value, None when absent, or a ConfigError with its line
    when icalendar could not read it (its lenient parser keeps such errors in `errors`)."""
    line, raw = lines.get(name, lines["BEGIN"])
    kinds, valid = ICS_DATES[name]
    problem = next((message for prop, message in getattr(item, "errors", []) if prop.upper() == name), None)
    value = item.get(name)
    if problem is None and isinstance(value, list):
        raise ConfigError(f"{where(line)}: {name} appears {len(value)} times; give it once")
    if problem is None and value is not None:
        value = getattr(value, "dt", None)
        problem = None if isinstance(value, kinds) else "not readable"
    if problem is not None:
        raise ConfigError(f"{where(line)}: {name} {raw!r}: {problem}; valid: {valid}")
    return value


def _texts(value: Any) -> list[str]:
    """A text or CATEGORIES property, given once or more, as its texts."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [str(text).strip() for v in values for text in getattr(v, "cats", [v])]


def _is_category(name: str) -> TypeGuard[Category]:
    return name in CATEGORIES


def _from_ics(path: Path, data: bytes) -> list[Event]:
    import icalendar

    try:
        calendar = icalendar.Calendar.from_ical(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a valid iCalendar file: {exc}") from None
    lines = _vevent_lines(data.decode("utf-8", errors="replace"))
    events = []
    for index, item in enumerate(calendar.walk("VEVENT")):
        at = lines[index] if index < len(lines) else {"BEGIN": (0, "VEVENT")}
        summary = next(iter(_texts(item.get("SUMMARY"))), "")
        label = f"VEVENT {index + 1}" + (f" ({summary!r})" if summary else "")

        def where(line: int, label: str = label) -> str:
            return f"{path}: line {line}: {label}"

        start = _ics_time(item, "DTSTART", where, at)
        if start is None:
            raise ConfigError(
                f"{where(at['BEGIN'][0])}: has no DTSTART; every event needs a start, e.g. DTSTART;VALUE=DATE:20240715"
            )
        end = _ics_time(item, "DTEND", where, at)
        duration = _ics_time(item, "DURATION", where, at)
        if end is not None and duration is not None:
            raise ConfigError(f"{where(at['DURATION'][0])}: has both DTEND and DURATION; give one")
        if duration is not None:
            end = start + duration
        if end is None:
            end = start
        elif not isinstance(end, datetime):
            end = end - timedelta(days=1)  # an all-day DTEND is exclusive
        categories = [c.lower() for c in _texts(item.get("CATEGORIES"))]
        category: Category = next((c for c in categories if _is_category(c)), "other")
        uid = next(iter(_texts(item.get("UID"))), "") or f"{summary}-{start}"
        url = next(iter(_texts(item.get("URL"))), "")
        try:
            events.append(
                Event(
                    id=_slug(uid),
                    title=summary or uid,
                    category=category,
                    start=start,
                    end=end,
                    confidence="reported",
                    source=f"{path.name}: {url or 'imported calendar'}",
                    origin=str(path),
                )
            )
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                message = e["msg"].removeprefix("Value error, ")
                prop = "DTSTART" if message.startswith("start") else "DURATION" if duration is not None else "DTEND"
                line = at.get(prop, at["BEGIN"])[0] if message.startswith(("start", "end")) else at["BEGIN"][0]
                raise ConfigError(f"{where(line)}: {message}") from None
    return events


def _is_ics(path: Path) -> bool:
    return path.suffix.lower() in (".ics", ".ical")


def _bytes(path: Path) -> bytes:
    kind = "iCalendar" if _is_ics(path) else "events"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {kind} file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: not a valid {kind} file: {exc}") from None


@functools.lru_cache(maxsize=32)
def _parsed(path: Path, data: bytes) -> tuple[Event, ...]:
    """A calendar file's events, parsed once per content (the file read once each time, so a
    pipe or a file being rewritten is parsed as read): a long-lived reader (the dashboard)
    asks for them with every page (20 ms for the shipped calendar). Events are frozen."""
    return tuple(_from_ics(path, data) if _is_ics(path) else _from_toml(path, data))


def load_events(files: Sequence[Path] = (), shipped: bool = True) -> list[Event]:
    """The shipped calendar plus the given TOML and .ics files; an id used twice is an error."""
    paths = ([shipped_events_path()] if shipped else []) + list(files)
    events: dict[str, Event] = {}
    for path in paths:
        for event in _parsed(path, _bytes(path)):
            if event.id in events:
                raise ConfigError(f"{path}: event id {event.id!r} is already defined in {events[event.id].origin}")
            events[event.id] = event
    return sorted(events.values(), key=lambda e: (e.span[0], e.id))


def select(
    events: Iterable[Event], *, ids: Sequence[str] = (), categories: Sequence[str] = (), year: int | None = None
) -> list[Event]:
    events = list(events)
    known = {e.id for e in events}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ConfigError(f"no event with id {', '.join(map(repr, unknown))}; `tunnelwatch events list` shows them")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ConfigError(f"no category {', '.join(map(repr, bad))}; valid: {', '.join(CATEGORIES)}")
    chosen = [e for e in events if (not ids or e.id in ids) and (not categories or e.category in categories)]
    if year is not None:
        chosen = [e for e in chosen if e.span[0].year <= year <= e.span[1].year]
    return chosen
