"""The event calendar: the shipped config/events.toml, users' own TOML files, iCalendar imports.

Dates are Beijing local dates: a date covers 00:00-24:00 Asia/Shanghai, the end date
included. A start or end with a time and an offset is taken as it is.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import icalendar
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from probe.errors import ConfigError

BEIJING = ZoneInfo("Asia/Shanghai")
CATEGORIES = ("npc", "cppcc", "party-congress", "policy", "blocking-wave", "anniversary", "holiday", "other")
Category = Literal["npc", "cppcc", "party-congress", "policy", "blocking-wave", "anniversary", "holiday", "other"]
Confidence = Literal["confirmed", "reported", "approximate"]


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
        if self.window[1] <= self.window[0]:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def window(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """[start, end) in UTC."""
        return _instant(self.start, end=False), _instant(self.end, end=True)


def _instant(value: datetime | date, end: bool) -> pd.Timestamp:
    if isinstance(value, datetime):
        return pd.Timestamp(value).tz_convert("UTC")
    day = value + timedelta(days=1) if end else value
    return pd.Timestamp(datetime.combine(day, time(0), tzinfo=BEIJING)).tz_convert("UTC")


def shipped_events_path() -> Path:
    return Path(str(resources.files("tunnelwatch_config").joinpath("events.toml")))


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "date", "datetime")))


def _from_toml(path: Path) -> list[Event]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such events file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid events file: {exc}") from None
    items = raw.get("events")
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected [[events]] tables, found keys {sorted(raw)}")
    events = []
    for index, item in enumerate(items):
        try:
            events.append(Event.model_validate({**item, "origin": str(path)}))
        except ValidationError as exc:
            where = f"events[{index}]" + (f" (id {item.get('id')!r})" if isinstance(item, dict) else "")
            problems = "; ".join(
                f"{_key(e['loc']) or 'event'}: {e['msg'].removeprefix('Value error, ')}"
                + ("" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})")
                for e in exc.errors(include_url=False)
            )
            raise ConfigError(f"{path}: {where}: {problems}") from None
    return events


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-") or "event"


def _from_ics(path: Path) -> list[Event]:
    try:
        calendar = icalendar.Calendar.from_ical(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such iCalendar file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a valid iCalendar file: {exc}") from None
    events = []
    for index, item in enumerate(calendar.walk("VEVENT")):
        summary = str(item.get("SUMMARY", "")).strip()
        where = f"{path}: VEVENT {index + 1}" + (f" ({summary!r})" if summary else "")
        if item.get("DTSTART") is None:
            raise ConfigError(f"{where}: has no DTSTART; every event needs a start date")
        start = item.get("DTSTART").dt
        end = item.get("DTEND").dt if item.get("DTEND") is not None else start
        if not isinstance(end, datetime) and item.get("DTEND") is not None:
            end = end - timedelta(days=1)  # an all-day DTEND is exclusive
        categories = [str(c).strip().lower() for c in getattr(item.get("CATEGORIES"), "cats", [])]
        category = next((c for c in categories if c in CATEGORIES), "other")
        uid = str(item.get("UID", "")) or f"{summary}-{start}"
        try:
            events.append(Event(
                id=_slug(uid), title=summary or uid, category=category, start=start, end=end,
                confidence="reported", source=f"{path.name}: {item.get('URL', '') or 'imported calendar'}",
                origin=str(path),
            ))  # fmt: skip
        except ValidationError as exc:
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
            raise ConfigError(f"{where}: {problems}") from None
    return events


def load_events(files: Sequence[Path] = (), shipped: bool = True) -> list[Event]:
    """The shipped calendar plus the given TOML and .ics files; an id used twice is an error."""
    paths = ([shipped_events_path()] if shipped else []) + list(files)
    events: dict[str, Event] = {}
    for path in paths:
        for event in _from_ics(path) if path.suffix.lower() in (".ics", ".ical") else _from_toml(path):
            if event.id in events:
                raise ConfigError(f"{path}: event id {event.id!r} is already defined in {events[event.id].origin}")
            events[event.id] = event
    return sorted(events.values(), key=lambda e: (e.window[0], e.id))


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
        chosen = [e for e in chosen if e.window[0].year <= year <= e.window[1].year]
    return chosen
