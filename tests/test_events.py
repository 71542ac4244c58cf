"""The shipped event calendar (config/events.toml): every event names a source a user can
look up, and its confidence matches what that source can say."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

from analysis.events import load_events


def test_no_shipped_event_cites_the_notes_it_was_written_from() -> None:
    """EVENTS.md is the project's working notes, not something a user has or can check."""
    events = load_events()
    assert events and all(e.source for e in events)
    assert [e.id for e in events if "EVENTS.md" in e.source or "shared" in e.source.split()] == []


def test_a_rumour_is_not_confirmed() -> None:
    rumours = [e for e in load_events() if "rumour" in f"{e.title} {e.source}".lower()]
    assert [e.id for e in rumours] == ["vpn-ban-rumour-2018"]
    assert [e.id for e in rumours if e.confidence == "confirmed"] == []


def test_the_2018_spring_festival_is_the_state_councils_holiday() -> None:
    """2018-02-15 to 2018-02-21, seven days, as the State Council's notice of 2017-11-30 says."""
    (festival,) = [e for e in load_events() if e.id == "spring-festival-2018"]
    assert (festival.start, festival.end) == (date(2018, 2, 15), date(2018, 2, 21))
    assert "State Council" in festival.source and "www.gov.cn" in festival.source


def test_a_calendar_file_is_read_again_when_its_bytes_change_and_from_a_pipe(tmp_path: Path) -> None:
    """load_events parses a file once per content: a rewrite of the same size (often within
    the same clock tick) is read anew, and a pipe (`--events <(...)`) is read once, whole."""
    text = '[[events]]\nid = "x"\ntitle = "t"\ncategory = "other"\nstart = 2018-03-0{day}\nend = 2018-03-0{day}\n'
    path = tmp_path / "mine.toml"
    for day in (1, 2, 1):
        path.write_text(text.format(day=day))
        (event,) = load_events([path], shipped=False)
        assert event.start == date(2018, 3, day)
    read, write = os.pipe()
    os.write(write, text.format(day=3).encode())
    os.close(write)
    try:
        (event,) = load_events([Path(f"/dev/fd/{read}")], shipped=False)
    finally:
        os.close(read)
    assert event.start == date(2018, 3, 3)
