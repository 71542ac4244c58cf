"""Alerts: the daemon's outages as they happen, and the messages that tell people about them.

After each round (or each `alerts.group_s`) the daemon runs `tunnelwatch alerts evaluate`,
which judges the recent rounds with the code `tunnelwatch outages --by target` runs
(pipeline.analyse: the rule table of verdicts.py, the hysteresis of outages.py, the
degradation rule), compares the outages it finds with the alerts the store holds
(probe/store/alerts.py), and in one transaction saves the alerts and queues one message per
destination listing every change (probe/store/outbox.py); the daemon sends them
(probe/daemon/notifier.py).

- An alert opens when an outage of a (target, path) opens and closes when it closes, with
  the outage's start and end, verdict, rules, blocking type, the last failure string, and
  for tunnel_down the state of the tunnel server's port.
- A gap in the rounds (the daemon stopped) never opens an alert and does not close one by
  itself: an open alert closes after `analysis.close_after` good rounds, or goes on if the
  pair is still failing after the gap.
- "Back" waits for `analysis.settle_after` good rounds in a row, the settle rule of
  outages.py: a new outage before that is the same one going on (a share of connections
  dropped at random is one alert, not one per flap), as `tunnelwatch outages` lists it.
- Who hears what: `alerts.kinds`, `alerts.paths`, `alerts.groups`; an outage shorter than
  `alerts.min_duration_s` is never announced; a change of verdict of an announced outage
  is announced once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import pandas as pd

from probe.config import Config
from probe.store.alerts import BACK, DOWN, Alert, evaluated_until, open_alerts, recent_alerts, save, set_evaluated
from probe.store.file import store_error
from probe.store.outbox import destination_id, enqueue
from probe.store.schema import to_ms
from probe.store.sqlite import writable

from .frames import Source
from .outages import Hysteresis
from .pipeline import analyse
from .verdicts import DEGRADED, FAILING, RULES

MIN_WINDOW = pd.Timedelta(hours=6)
FIRST_WINDOW = pd.Timedelta(days=2)  # the first evaluation looks this far back for outages open now
SHOWN_TARGETS = 8  # a message line names this many targets, then counts the rest
DESCRIPTIONS = {rule.id: rule.description for rule in RULES}
UPDATE = "update"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # DOWN, BACK (a "down" that is already over is announced as BACK with was_down), UPDATE
    alert: Alert
    was_down: bool = False  # BACK of an outage never announced as down: it came and went between evaluations
    previous: str = ""  # UPDATE: the verdict announced before


def window(cfg: Config) -> pd.Timedelta:
    """How far back each evaluation judges: enough rounds of the slowest group for the hysteresis."""
    slowest = max([cfg.probe.interval_s, *cfg.probe.group_intervals_s.values()])
    rounds = cfg.analysis.open_after + max(cfg.analysis.close_after, cfg.analysis.settle_after) + 3
    return max(MIN_WINDOW, pd.Timedelta(seconds=2 * slowest * rounds))


def evaluate(cfg: Config, now: datetime) -> list[Change]:
    """Judge the rounds up to `now`, save the alerts, queue the message; the changes."""
    path = cfg.store.path
    conn = writable(path)
    try:
        cursor = evaluated_until(conn)
        since = pd.Timestamp(now) - (window(cfg) if cursor is not None else max(window(cfg), FIRST_WINDOW))
        found = analyse(
            Source(path),
            since.to_pydatetime(),
            now,
            slot_s=cfg.probe.interval_s,
            hysteresis=Hysteresis(
                cfg.analysis.open_after, cfg.analysis.close_after, settle_after=cfg.analysis.settle_after
            ),
            degraded_factor=cfg.analysis.degraded_factor,
            degraded_min_ms=cfg.analysis.degraded_min_ms,
        )
        now_ms = to_ms(now)
        conn.execute("BEGIN IMMEDIATE")
        facts = _Facts.read(conn, to_ms(since.to_pydatetime()), now_ms)
        judge = _Judge(cfg, found.summary.runs, cursor, now_ms, facts)
        opened, recent = open_alerts(conn), recent_alerts(conn, to_ms(since.to_pydatetime()))
        changes = judge.pairs([a for a in opened if a.target != "*"], recent, found.pairs)
        slow = found.paths[found.paths["verdict"] == DEGRADED]
        changes += judge.degraded([a for a in opened if a.target == "*"], recent, slow)
        save(conn, judge.saved)
        if changes and cfg.alerts.urls:
            title, body = message(cfg, changes)
            destinations = [destination_id(url.get_secret_value()) for url in cfg.alerts.urls]
            enqueue(conn, title, body, destinations, now_ms)
        set_evaluated(conn, now_ms)
        conn.execute("COMMIT")
        return changes
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise store_error(path, exc, "save alerts") from None
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the verdict runs do not hold: each pair's failures and each target's group."""

    failures: dict[tuple[str, str], list[tuple[int, str]]]  # (target, path) -> [(ms, "failure at operation")]
    groups: dict[str, str]

    @classmethod
    def read(cls, conn: sqlite3.Connection, since_ms: int, until_ms: int) -> _Facts:
        rows = conn.execute(
            "SELECT target, path, started_at_ms, failure, failed_operation FROM measurements "
            "WHERE started_at_ms >= ? AND started_at_ms <= ? AND ok = 0 ORDER BY started_at_ms",
            [since_ms, until_ms],
        )
        failures: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for target, path, ms, failure, operation in rows:
            failures[(target, path)].append((ms, f"{failure or ''}{f' at {operation}' if operation else ''}"))
        groups = conn.execute(
            "SELECT target, grp FROM measurements WHERE started_at_ms >= ? GROUP BY target", [since_ms]
        ).fetchall()
        return cls(failures, dict(groups))

    def last_failure(self, target: str, path: str, until_ms: int) -> str | None:
        before = [text for ms, text in self.failures.get((target, path), []) if ms < until_ms]
        return before[-1] if before else None


class _Judge:
    """Outages found now against the alerts stored: what to save and what changed."""

    def __init__(self, cfg: Config, runs: pd.DataFrame, cursor: int | None, now_ms: int, facts: _Facts) -> None:
        self.cfg = cfg
        self.cursor = cursor
        self.now_ms = now_ms
        self.facts = facts
        self.saved: list[Alert] = []
        self._runs = {key: g.sort_values("first") for key, g in runs.groupby(["target", "path"], observed=True)}

    def heard(self, alert: Alert) -> bool:
        a = self.cfg.alerts
        return (
            alert.verdict in a.kinds
            and (not a.paths or alert.path in a.paths)
            and (not a.groups or alert.target == "*" or alert.grp in a.groups)
        )

    def _good_after(self, target: str, path: str, ms: int, *, longest: bool = False) -> int:
        """Good rounds of the pair in a row from the first round at or after `ms`; `longest`:
        the most in a row at any point after `ms`."""
        runs = self._runs.get((target, path))
        if runs is None:
            return 0
        good = best = 0
        for state, first, rounds in zip(runs["state"], runs["first"], runs["rounds"], strict=True):
            if to_ms(first) < ms:
                continue
            if state == FAILING:
                if not longest:
                    break
                good = 0
                continue
            good += int(rounds)
            best = max(best, good)
        return best

    def _seen(self, alert: Alert, o: pd.Series) -> Alert:
        target, path = alert.target, alert.path
        end = to_ms(o["end"])
        runs = self._runs.get((target, path))
        detail = alert.detail
        if runs is not None:  # what the outage's latest failing rounds said of the tunnel's server port
            failing = runs[(runs["state"] == FAILING) & (runs["first"] < o["end"]) & (runs["last"] >= o["start"])]
            details = [d for d in failing["detail"] if d]
            detail = str(details[-1]) if details else detail
        return alert.changed(
            detail=detail,
            verdict=o["verdict"],
            rules=tuple(sorted({*alert.rules, *o["rules"]})),  # every rule of the outage so far
            blocking=_blocking(o["rules"]),
            failure=self.facts.last_failure(target, path, end) or alert.failure,
            updated_ms=max(alert.updated_ms, to_ms(o["end"])),
        )

    def pairs(self, opened: list[Alert], recent: list[Alert], outages: pd.DataFrame) -> list[Change]:
        """Every (target, path): its open alert followed, or a new outage found."""
        changes: list[Change] = []
        by_pair: dict[tuple[str, str], list[pd.Series]] = defaultdict(list)
        for _, o in outages.sort_values("start").iterrows():
            by_pair[(o["path"], o["target"])].append(o)
        for alert in opened:
            changes += self._follow(alert, by_pair.pop((alert.path, alert.target), []))
        told = defaultdict(list)
        for a in recent:
            told[(a.path, a.target)].append(a)
        for key, found in by_pair.items():
            for o in found:
                start, end = to_ms(o["start"]), to_ms(o["end"])
                if any(a.start_ms <= end and (a.end_ms or end) >= start for a in told[key]):
                    continue  # an alert has it already
                if not o["ongoing"] and (self.cursor is None or end <= self.cursor):
                    continue  # over before the last evaluation (or before alerts were kept)
                group = self.facts.groups.get(key[1], "")
                alert = self._seen(
                    Alert(path=key[0], target=key[1], grp=group, verdict="", rules=(), start_ms=start), o
                )
                changes += self._announce(alert if o["ongoing"] else alert.changed(end_ms=end))
        return changes

    def cursor_or_now(self) -> int:
        """Up to when outages have been seen: the last evaluation (or now, at the first)."""
        return self.cursor if self.cursor is not None else self.now_ms

    def _follow(self, alert: Alert, found: list[pd.Series]) -> list[Change]:
        """An open alert and the pair's outages in the window."""
        ongoing = found[-1] if found and found[-1]["ongoing"] else None
        before = [
            o
            for o in found
            if not o["ongoing"] and to_ms(o["end"]) > alert.start_ms and to_ms(o["start"]) <= self.cursor_or_now()
        ]
        if ongoing is not None:
            ended = before[-1] if before else None
            if ended is not None and self._good_after(alert.target, alert.path, to_ms(ended["end"])) >= (
                self.cfg.analysis.close_after
            ):  # it closed, then a new outage opened: back, and a new alert
                changes = self._announce(self._seen(alert, ended).changed(end_ms=to_ms(ended["end"])))
                fresh = Alert(
                    path=alert.path,
                    target=alert.target,
                    grp=alert.grp,
                    verdict=ongoing["verdict"],
                    rules=(),
                    start_ms=to_ms(ongoing["start"]),
                )
                return changes + self._announce(self._seen(fresh, ongoing))
            return self._announce(self._seen(alert, ongoing))
        last = before[-1] if before else None
        end_ms = to_ms(last["end"]) if last is not None else alert.updated_ms
        settle = max(self.cfg.analysis.close_after, self.cfg.analysis.settle_after)
        if self._good_after(alert.target, alert.path, end_ms, longest=True) < settle:
            return self._announce(alert if last is None else self._seen(alert, last))  # not decided yet
        return self._announce((alert if last is None else self._seen(alert, last)).changed(end_ms=end_ms))

    def degraded(self, opened: list[Alert], recent: list[Alert], slow: pd.DataFrame) -> list[Change]:
        """A path's degradation is judged by the hour (outages.degraded): a degraded hour that
        ended within the last hour is still now."""
        changes: list[Change] = []
        lately = self.now_ms - 3600 * 1000
        current = {a.path: a for a in opened}
        told = {a.path: a.end_ms or a.updated_ms for a in recent if a.target == "*"}
        for _, o in slow.sort_values("start").iterrows():
            path, start, end = str(o["path"]), to_ms(o["start"]), to_ms(o["end"])
            if end < lately:
                continue
            detail = f"{o['factor']:.1f}x the 7-day median"
            if (alert := current.pop(path, None)) is not None:
                changes += self._announce(alert.changed(rules=tuple(o["rules"]), detail=detail, updated_ms=end))
            elif start > told.get(path, 0):
                alert = Alert(path=path, target="*", grp="", verdict=DEGRADED, rules=tuple(o["rules"]), start_ms=start)
                changes += self._announce(alert.changed(updated_ms=end, detail=detail))
        for alert in current.values():  # no degraded hour lately: it is over
            changes += self._announce(alert.changed(end_ms=alert.updated_ms))
        return changes

    def _announce(self, alert: Alert) -> list[Change]:
        """Save the alert as it is now; the change to tell, if any."""
        change: Change | None = None
        # as long as its rounds have shown: not the good rounds of one waiting to settle
        shown = alert.end_ms or alert.updated_ms or self.now_ms
        long_enough = shown - alert.start_ms >= self.cfg.alerts.min_duration_s * 1000
        if alert.open:
            if not alert.announced and self.heard(alert) and long_enough:
                change = Change(DOWN, alert)
                alert = alert.changed(announced=DOWN, announced_verdict=alert.verdict)
            elif alert.announced == DOWN and alert.verdict != alert.announced_verdict and self.heard(alert):
                change = Change(UPDATE, alert, previous=alert.announced_verdict)
                alert = alert.changed(announced_verdict=alert.verdict)
        elif alert.announced == DOWN:
            change = Change(BACK, alert)
            alert = alert.changed(announced=BACK)
        elif not alert.announced and self.heard(alert) and long_enough:
            change = Change(BACK, alert, was_down=True)
            alert = alert.changed(announced=BACK, announced_verdict=alert.verdict)
        self.saved.append(alert)
        return [] if change is None else [change]


def _blocking(rules: Iterable[str]) -> str:
    return next(
        (r.removeprefix("blocked-") for r in rules if r.startswith("blocked-") and r != "blocked-behind-tunnel"), ""
    )


def message(cfg: Config, changes: list[Change]) -> tuple[str, str]:
    """One message for a round's changes: a line per (path, change, verdict), readable on a phone."""
    zone = ZoneInfo(cfg.report.timezone)
    groups: dict[tuple[str, str, str], list[Change]] = defaultdict(list)
    for c in changes:
        groups[(c.alert.path, c.kind, c.alert.verdict)].append(c)
    lines = []
    for (path, kind, verdict), group in sorted(
        groups.items(), key=lambda g: ({DOWN: 0, UPDATE: 1}.get(g[0][1], 2), g[0])
    ):
        first = min(group, key=lambda c: c.alert.start_ms).alert
        since = _clock(first.start_ms, zone, cfg)
        why = _why(first)
        targets = _targets([c.alert.target for c in group])
        if kind == DOWN:
            lines.append(f"{path} DOWN since {since}: {verdict} ({why}){targets}")
        elif kind == UPDATE:
            lines.append(f"{path} still down since {since}, now {verdict} (was {group[0].previous}; {why}){targets}")
        else:
            last_end = max(c.alert.end_ms or 0 for c in group)
            minutes = (last_end - first.start_ms) / 60000
            was = f"was down {since} to {_clock(last_end, zone, cfg)}" if group[0].was_down else f"down since {since}"
            lines.append(f"{path} back after {_duration(minutes)} ({verdict}, {was}){targets}")
    down = sum(1 for c in changes if c.kind == DOWN)
    back = sum(1 for c in changes if c.kind == BACK)
    parts = [f"{down} down" if down else "", f"{back} back" if back else "", "updated" if not down and not back else ""]
    title = f"tunnelwatch {cfg.vantage.name}: " + ", ".join(p for p in parts if p)
    return title, "\n".join(lines)


def _clock(ms: int, zone: ZoneInfo, cfg: Config) -> str:
    moment = pd.Timestamp(ms, unit="ms", tz="UTC").tz_convert(zone)
    return moment.strftime("%Y-%m-%d %H:%M %Z")


def _duration(minutes: float) -> str:
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} days"


def _why(alert: Alert) -> str:
    rule = alert.rules[0] if alert.rules else ""
    parts = [DESCRIPTIONS.get(rule, rule)]
    if alert.detail:
        parts.append(alert.detail)
    if alert.failure:
        parts.append(f"last failure {alert.failure}")
    return "; ".join(p for p in parts if p)


def _targets(names: list[str]) -> str:
    named = [n for n in sorted(set(names)) if n != "*"]
    if not named:
        return ""
    shown = ", ".join(named[:SHOWN_TARGETS]) + (
        f" and {len(named) - SHOWN_TARGETS} more" if len(named) > SHOWN_TARGETS else ""
    )
    return f"; {len(named)} target{'s' if len(named) != 1 else ''}: {shown}"
