"""The shipped event calendar (config/events.toml): every event names a source a user can
look up, and its confidence matches what that source can say."""

from __future__ import annotations

from datetime import date

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
