"""`tunnelwatch serve` in a real browser: Playwright driving Debian's chromium (never a
downloaded one) against the command serving stores of known outages on loopback.

Each page is loaded as a person would, every request it makes recorded (none may leave the
served origin), its facts read off the page and compared with its JSON form and with what
`tunnelwatch outages --format json` prints. Screenshots go to /tmp/dashboard-*.png.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright

from analysis.web.cache import Pages
from probe.config import load_config
from probe.fleet.forwarder import Forwarder
from tests.analysis_data import analysis_config, build_store, everything, fail, realistic_week
from tests.daemonproc import Daemon, fast, scrape
from tests.postgres import cluster

TUNNELWATCH = [sys.executable, "-m", "probe"]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: scripts/install-debian-packages chromium
HOST = "127.0.9.65"  # the dashboard tests' own loopback address
START_S = 90  # a cold start imports pandas and matplotlib: generous on a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    origin: str
    config: Path
    process: subprocess.Popen[str]
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.origin + path, headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, answer.headers.get("content-type", ""), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("content-type", ""), exc.read()

    def json(self, path: str) -> Any:
        status, kind, body = self.get(path, {"Accept": "application/json"})
        assert status == 200 and kind.startswith("application/json"), (status, body[:300])
        return json.loads(body)


def serve(config: Path, log: Path, env: dict[str, str] | None = None, *more: str) -> Iterator[Served]:
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [*TUNNELWATCH, "serve", "--config", str(config), "--listen", f"{HOST}:{port}", *more],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    served = Served(f"http://{HOST}:{port}", config, process, log)
    deadline = time.monotonic() + START_S
    try:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"serve did not listen in {START_S} s: {log.read_text()}"
                time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """realistic_week: the tunnel crackdown (Tuesday 10:00 to Wednesday 02:00 Beijing), DNS
    poisoning, throttling, the daemon stopped; and a weekly report in report.directory."""
    tmp = tmp_path_factory.mktemp("week")
    realistic_week(tmp / "week.db")
    reports = tmp / "reports"
    reports.mkdir()
    (reports / "tunnelwatch-2018-W10.html").write_text("<!doctype html><title>report W10</title><h1>W10</h1>")
    (reports / "tunnelwatch-2018-W09.html").write_text("<!doctype html><title>report W09</title><h1>W09</h1>")
    config = analysis_config(tmp, tmp / "week.db", f'[report]\ndirectory = "{reports}"')
    yield from serve(config, tmp / "serve.log")


LAST = 24 * 12  # a day of 5-minute rounds
TUNNEL_FAILS = range(LAST - 24, LAST)  # the last two hours: the tunnel is down, now


@pytest.fixture(scope="module")
def now(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A day in which the blocked sites fail directly throughout and the tunnel (vpn) has
    failed for the last two hours, its endpoint unreachable: vpn down, direct degraded
    (blocked), wg up."""
    tmp = tmp_path_factory.mktemp("now")
    blocked = {(t, "direct"): fail("connection_reset", "tls_handshake") for t in ("news", "search")}
    tunnel = {(t, "vpn"): fail("eof_error", "http_round_trip") for t in ("news", "search", "portal", "shop")}
    tunnel[("vpn-endpoint", "direct")] = fail("generic_timeout_error", "connect")
    rounds = [(i, everything({**blocked, **(tunnel if i in TUNNEL_FAILS else {})})) for i in range(LAST)]
    build_store(tmp / "now.db", rounds)
    # fleet mode (store.url): the store is a spool, nothing of it uploaded (the URL is never used)
    spool = 'url = "postgresql://tunnelwatch@127.0.9.66:9/fleet"'
    yield from serve(analysis_config(tmp, tmp / "now.db", spool), tmp / "serve.log")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: scripts/install-debian-packages chromium"
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
    yield browser
    browser.close()


@dataclass
class Visit:
    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    seen = Visit(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            seen.errors.append(message.text)

    def on_request(request: Request) -> None:
        seen.requests.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    page.on("request", on_request)
    yield seen
    context.close()


def load(visit: Visit, served: Served, path: str, shot: str | None = None) -> Page:
    """The page at `path`, loaded whole; every request it made to the served origin, no error."""
    answer = visit.page.goto(served.origin + path, wait_until="load", timeout=120_000)
    assert answer is not None and answer.status == 200, (answer and answer.status, path)
    assert visit.errors == []
    outside = [url for url in visit.requests if not url.startswith(served.origin + "/")]
    assert outside == [], f"{path} made requests away from {served.origin}: {outside}"
    if shot:
        visit.page.screenshot(path=f"/tmp/dashboard-{shot}.png", full_page=True)
        with Image.open(f"/tmp/dashboard-{shot}.png") as image:  # not blank: many colours, drawn past the header
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, shot
            assert image.height >= 400, shot
    return visit.page


def texts(page: Page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_now_cards_show_each_paths_state(now: Served, visit: Visit) -> None:
    page = load(visit, now, "/", "now")
    states = {c.get_attribute("data-path"): c.get_attribute("data-state") for c in page.locator(".card").all()}
    assert states == {"direct": "degraded", "vpn": "down", "wg": "up"}
    vpn = page.locator(".card[data-path=vpn]").inner_text()
    assert "tunnel_down" in vpn and "since 2018-03-01 22:00Z" in vpn  # the first failing round of the last two hours
    assert "blocked" in page.locator(".card[data-path=direct]").inner_text()
    assert "UP since 2018-03-01 00:00Z" in page.locator(".card[data-path=wg]").inner_text()  # the first round
    assert page.locator("#late").inner_text() == "0.0 s"  # every round on its schedule
    measured = LAST * (4 * 3 + 1)
    assert page.locator("#backlog").inner_text().startswith(f"{measured} measurements not uploaded yet")
    row = page.locator("#targets tr", has_text="portal")
    assert "eof_error" in row.inner_text() and "http_round_trip" in row.inner_text()
    assert page.locator("meta[http-equiv=refresh]").count() == 1
    # the JSON form says the same
    facts = now.json("/")
    assert {c["path"]: c["state"] for c in facts["paths"]} == states
    vpn_card = next(c for c in facts["paths"] if c["path"] == "vpn")
    assert (vpn_card["verdict"], vpn_card["since"]) == ("tunnel_down", "2018-03-01T22:00:00.001000+00:00")
    assert facts["backlog"] == {"measurements": measured, "oldest": "2018-03-01T00:00:00+00:00", "dropped": 0}
    assert facts["heartbeat"]["late_max_s"] == 0.0
    portal = next(t for t in facts["targets"] if t["target"] == "portal")
    assert portal["paths"]["vpn"]["failure"] == "eof_error" and portal["paths"]["wg"]["ok"] is True


def outages_json(served: Served, since: str, until: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            *TUNNELWATCH,
            "outages",
            "--config",
            str(served.config),
            "--format",
            "json",
            "--since",
            since,
            "--until",
            until,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_outages_lists_the_crackdown_and_links_to_its_round(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/outages", "outages")
    crackdown = page.locator("table.outages tbody tr[data-path=vpn]")
    assert crackdown.count() == 1
    cells = texts(crackdown, "td")
    assert cells[5] == "tunnel_down" and cells[2:5] == ["2018-03-06 02:00Z", "2018-03-06 18:10Z", "16:10:00"]
    # the same rows as `tunnelwatch outages --format json` over the page's range
    facts = week.json("/outages")
    assert facts["rows"] == outages_json(week, facts["since"], facts["until"])
    assert len(facts["rows"]) == page.locator("table.outages tbody tr").count()
    shown = [(r.get_attribute("data-path"), r.get_attribute("data-verdict")) for r in page.locator("tbody tr").all()]
    assert shown == [(r["path"], r["verdict"]) for r in facts["rows"]]
    crackdown.locator("a.round").click()
    page.wait_for_load_state("load")
    assert page.url.startswith(week.origin + "/rounds?")
    visit.page.screenshot(path="/tmp/dashboard-rounds.png", full_page=True)
    vpn_rows = page.locator("#measurements tbody tr[data-path=vpn]")
    assert vpn_rows.count() == 4  # the four sites' rounds of that slot, through the tunnel
    assert all("eof_error" in t and "http_round_trip" in t for t in vpn_rows.all_inner_texts())
    headers = texts(page, "#measurements th")
    assert {"resolve", "proxy", "connect", "tls", "first byte", "total"} <= set(headers)
    assert page.locator("#measurements tbody tr[data-path=wg][data-ok=true]").count() == 4
    assert [u for u in visit.requests if not u.startswith(week.origin + "/")] == []


def test_outages_sort_by_a_column(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/outages?sort=duration&desc=1")
    durations = texts(page, "table.outages tbody tr td:nth-child(5)")
    assert durations == ["5 days 03:00:10", "1 days 15:00:10", "16:10:00", "04:00:00", "00:10:00"]


def test_history_shows_the_weekly_charts_inline(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/history", "history")
    for name in ("availability", "latency", "outages"):
        chart = page.locator(f"#chart-{name} > svg")
        assert chart.count() == 1, name
        box = chart.bounding_box()
        assert box is not None and box["width"] > 800 and box["height"] > 150, (name, box)
    assert "Availability per hour" in page.locator("#chart-availability").inner_text()
    facts = week.json("/history")
    assert (facts["since"], facts["until"]) == ("2018-03-04T16:00:00+00:00", "2018-03-11T16:00:00+00:00")
    assert [(o["path"], o["verdict"]) for o in facts["outages"]] == [
        (r.get_attribute("data-path"), r.get_attribute("data-verdict")) for r in page.locator("tbody tr").all()
    ]
    assert 85 < facts["availability_pct"]["vpn"] < 95  # 16 hours of 7 days down, and some noise
    status, kind, body = week.get(facts["charts"]["latency"])
    assert status == 200 and kind == "image/svg+xml" and body.startswith(b"<svg") and b"Latency (connect)" in body
    status, kind, body = week.get(facts["charts"]["latency"].replace("svg?", "png?"))
    assert status == 200 and kind == "image/png" and body.startswith(b"\x89PNG")


def test_history_of_one_path(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/history?since=2018-03-06&until=2018-03-07&path=vpn")
    assert {r.get_attribute("data-path") for r in page.locator("tbody tr").all()} == {"vpn"}
    assert page.locator(".chart > svg").count() == 3


def test_events_page_says_what_events_check_says(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/events", "events")
    facts = week.json("/events")
    assert facts["rows"] == [] and "the baseline alone needs 35" in facts["message"]
    assert page.locator("#message").inner_text() == facts["message"]


def test_reports_newest_first_and_served(week: Served, visit: Visit) -> None:
    page = load(visit, week, "/reports", "reports")
    assert texts(page, "#reports tbody td:first-child") == ["2018-W10", "2018-W09"]
    assert week.json("/reports")["reports"][0]["name"] == "tunnelwatch-2018-W10.html"
    page.locator("#reports a", has_text="W10").click()
    page.wait_for_load_state("load")
    assert page.locator("h1").inner_text() == "W10"
    status, _, _ = week.get("/reports/..%2Ftunnelwatch.toml")
    assert status == 404


def test_every_page_as_json_by_query_or_header(week: Served) -> None:
    for path in ("/", "/history", "/outages", "/events", "/reports"):
        by_header = week.json(path)
        status, kind, body = week.get(path + ("&" if "?" in path else "?") + "format=json")
        assert status == 200 and kind.startswith("application/json")
        assert json.loads(body) == by_header, path
        status, kind, _ = week.get(path, {"Accept": "text/html,application/json;q=0.9"})
        assert status == 200 and kind.startswith("text/html"), path


def test_bad_input_is_a_400_not_a_traceback(week: Served) -> None:
    status, _, body = week.get("/outages?since=yesterday")
    assert status == 400 and b"not a date" in body
    status, _, body = week.get("/outages?since=2018-03-08&until=2018-03-01", {"Accept": "application/json"})
    assert status == 400 and "not before" in json.loads(body)["error"]


PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A store served with metrics.username and metrics.password (the password a ${...} secret)."""
    tmp = tmp_path_factory.mktemp("guarded")
    build_store(tmp / "g.db", [(i, everything()) for i in range(24)])
    extra = '[metrics]\nusername = "watcher"\npassword = "${TW_TEST_DASHBOARD_PASSWORD}"'
    config = analysis_config(tmp, tmp / "g.db", extra)
    yield from serve(config, tmp / "serve.log", {"TW_TEST_DASHBOARD_PASSWORD": PASSWORD})


def test_basic_authentication_guards_every_page(guarded: Served, browser: Browser) -> None:
    for path in ("/", "/history", "/outages", "/events", "/reports", "/history/latency.svg", "/reports/x.html"):
        status, _, _ = guarded.get(path)
        assert status == 401, path
    status, _, _ = guarded.get("/", basic("watcher", "wrong"))
    assert status == 401
    status, _, _ = guarded.get("/", basic("someone", PASSWORD))
    assert status == 401
    guarded.headers = basic("watcher", PASSWORD)
    try:
        assert {c["path"]: c["state"] for c in guarded.json("/")["paths"]} == {"direct": "up", "vpn": "up", "wg": "up"}
    finally:
        guarded.headers = {}
    context = browser.new_context(http_credentials={"username": "watcher", "password": PASSWORD})
    try:
        seen = Visit(context.new_page())
        seen.page.on("request", lambda r: seen.requests.append(r.url))
        page = load(seen, guarded, "/")
        assert page.locator(".card[data-state=up]").count() == 3
    finally:
        context.close()
    assert PASSWORD not in guarded.log.read_text()


def test_a_warning_when_served_off_loopback_without_a_password(tmp_path: Path) -> None:
    """Bound to every address of a network namespace of the test's own (only its loopback
    is up there): the warning is logged, and not when a password is set."""
    build_store(tmp_path / "w.db", [(i, everything()) for i in range(3)])
    logs = {}
    for name, extra in (("open", ""), ("guarded", '[metrics]\nusername = "u"\npassword = "p"')):
        (tmp_path / name).mkdir()
        config = analysis_config(tmp_path / name, tmp_path / "w.db", extra)
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [
                    "unshare",
                    "--net",
                    "sh",
                    "-c",
                    'ip link set lo up && exec "$@"',
                    "sh",
                    *TUNNELWATCH,
                    "serve",
                    "--config",
                    str(config),
                    "--listen",
                    "0.0.0.0:9465",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + START_S
            while "tunnelwatch serve:" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)  # the warning comes before this line
        finally:
            process.terminate()
            process.wait(timeout=30)
        logs[name] = log.read_text()
    assert "WARNING" in logs["open"] and "without a password" in logs["open"], logs["open"]
    assert "without a password" not in logs["guarded"], logs["guarded"]


def test_a_username_without_a_password_is_refused(tmp_path: Path) -> None:
    build_store(tmp_path / "w.db", [(0, everything())])
    config = analysis_config(tmp_path, tmp_path / "w.db", '[metrics]\nusername = "watcher"')
    result = subprocess.run(
        [*TUNNELWATCH, "serve", "--config", str(config), "--listen", f"{HOST}:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "metrics" in result.stderr and "username and password go together" in result.stderr, result.stderr


def serve_children(pid: int) -> list[int]:
    """The `tunnelwatch serve` processes whose parent is `pid` (from /proc; the daemon has other
    children now and then: the alerts' evaluation, the compaction)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if parent == pid and b"\0serve\0--unix\0" in command:
            found.append(int(stat.parent.name))
    return found


def loaded(pid: int, library: str) -> bool:
    """Whether the process has a file of `library` (a site-packages folder) mapped."""
    return f"/site-packages/{library}/" in Path(f"/proc/{pid}/maps").read_text()


def test_the_daemon_serves_the_pages_beside_its_metrics(
    config_file: Path, daemons: Callable[..., Daemon], browser: Browser
) -> None:
    """metrics.listen answers /metrics as before and the pages through a `tunnelwatch serve`
    child started with the first page: the daemon never loads pandas; the page follows the
    rounds; the child stops with the daemon."""
    daemon = daemons(fast(config_file))
    daemon.wait_until(lambda: sum(h["target"] == "down" for h in daemon.heartbeats()) >= 2, what="2 rounds")
    samples = scrape(config_file)
    down = (("group", "control"), ("kind", "tcp"), ("path", "direct"), ("target", "down"))
    assert samples[("probe_success", down)] == 0
    assert serve_children(daemon.proc.pid) == []  # no page asked for yet: no child
    served = Served(f"http://{load_config(config_file).metrics.listen}", config_file, daemon.proc, daemon.log)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        seen = Visit(context.new_page())
        seen.page.on("request", lambda r: seen.requests.append(r.url))
        page = load(seen, served, "/", "daemon-now")
        states = {c.get_attribute("data-path"): c.get_attribute("data-state") for c in page.locator(".card").all()}
        assert set(states) == {"direct", "shadowsocks"}
        assert "connection_refused" in page.locator("#targets tr", has_text="down").inner_text()
        first = served.json("/")["newest"]
        rounds = len(daemon.heartbeats())
        daemon.wait_until(lambda: len(daemon.heartbeats()) > rounds, what="the next round")
        # the page follows the store (made again in the background, served meanwhile as it was)
        daemon.wait_until(lambda: served.json("/")["newest"] > first, timeout_s=120, what="the page's next round")
        page.reload()
        assert "Now" in page.locator("h1").inner_text()
        assert load(seen, served, "/outages").locator("h1").inner_text() == "Outages"
    finally:
        context.close()
    (child,) = serve_children(daemon.proc.pid)
    assert loaded(child, "pandas") and not loaded(daemon.proc.pid, "pandas")
    nice = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert nice == 10  # the pages yield the CPU to the probing
    assert scrape(config_file) != {}  # /metrics unchanged beside the pages
    assert daemon.stop() == 0, daemon.output()
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_pages_are_kept_until_the_store_changes_then_made_again(tmp_path: Path) -> None:
    """cache.Pages: a page made once while the store stays as it was; after a new round, the
    kept page is served while it is made again in the background (made at once when it is
    older than stale_s; served as it is while younger than fresh_s)."""
    db = tmp_path / "c.db"
    build_store(db, [(i, everything()) for i in range(3)])
    cfg = load_config(analysis_config(tmp_path, db))
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return len(made)

    kept, at_once, fresh = Pages(cfg, fresh_s=0), Pages(cfg, stale_s=0, fresh_s=0), Pages(cfg)
    try:
        assert [kept.get(("p",), make), kept.get(("p",), make), at_once.get(("p",), make)] == [1, 1, 2]
        build_store(db, [(3, everything())])  # the next round
        assert kept.get(("p",), make) == 1  # served as it was, made again meanwhile
        deadline = time.monotonic() + 60
        while kept.get(("p",), make) == 1:
            assert time.monotonic() < deadline, "the page was not made again"
            time.sleep(0.05)
        assert kept.get(("p",), make) == 3 and at_once.get(("p",), make) == 4
        assert len(made) == 4
        assert fresh.get(("p",), make) == 5  # a page younger than fresh_s is served though the store changed
        build_store(db, [(4, everything())])
        assert fresh.get(("p",), make) == 5 and len(made) == 5
    finally:
        kept.close()
        at_once.close()
        fresh.close()


CRACKDOWN = range(9 * 24 + 2, 9 * 24 + 10)  # 2018-03-10 02:00-10:00 UTC: the tunnel is down
MONTH_EVENTS = """
[[events]]
id = "test-crackdown"
title = "A crackdown on tunnels"
category = "blocking-wave"
start = 2018-03-10
end = 2018-03-10
confidence = "confirmed"
source = "the test"
"""


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """40 days of hourly rounds with one crackdown on the tunnel, and an event on its day:
    enough data for `events check`'s defaults (a 28-day baseline, a 7-day gap)."""
    tmp = tmp_path_factory.mktemp("month")
    down = {(t, "vpn"): fail("connection_refused", "proxy_connect") for t in ("news", "search", "portal", "shop")}
    start = datetime(2018, 2, 1, tzinfo=UTC)
    build_store(
        tmp / "m.db",
        [(i, everything(down if i in CRACKDOWN else {})) for i in range(40 * 24)],
        start,
        timedelta(hours=1),
    )
    (tmp / "events.toml").write_text(MONTH_EVENTS)
    assert (start + timedelta(hours=CRACKDOWN[0])).day == 10
    extra = f'[probe]\ninterval_s = 3600\n[analysis]\nevents = ["{tmp / "events.toml"}"]'
    yield from serve(analysis_config(tmp, tmp / "m.db", extra), tmp / "serve.log")


def test_events_page_shows_what_events_check_prints(month: Served, visit: Visit) -> None:
    page = load(visit, month, "/events", "events-month")
    facts = month.json("/events")
    result = subprocess.run(
        [*TUNNELWATCH, "events", "check", "--config", str(month.config), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [{k: row.get(k) for k in printed[0]} for row in facts["rows"]] == printed
    assert "test-crackdown" in [row["event"] for row in printed]
    shown = [texts(row, "td") for row in page.locator("#checks tbody tr").all()]
    assert [cells[0] for cells in shown] == [row["event"] for row in printed]
    assert [cells[-1] for cells in shown] == [row["verdict"] for row in printed]


def test_history_over_a_long_range_draws_dense_parts_as_images(week: Served) -> None:
    """Past a fortnight the hours are drawn as pictures inside the SVG, on every path's axes
    (they share their time axis), so a year stays a page's size."""
    facts = week.json("/history?since=2018-02-15&until=2018-03-12")
    status, _, body = week.get(facts["charts"]["latency"])
    assert status == 200 and body.count(b"<image") >= 3, body.count(b"<image")  # direct, vpn, wg
    status, _, body = week.get(facts["charts"]["availability"])
    assert status == 200 and body.count(b"<image") >= 1 and b"1970" not in body  # the colour bar kept its own axis


@pytest.fixture(scope="module")
def central(week: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The week's store forwarded to the fleet's PostgreSQL, served from there (--store URL)."""
    tmp = tmp_path_factory.mktemp("central")
    with cluster() as postgres:
        url = postgres.database("dashboard")
        realistic_week(tmp / "spool.db")
        forwarder = Forwarder(tmp / "spool.db", url, "lab", batch=10_000, max_backlog=10_000_000)
        forwarder.forward()
        forwarder.close()
        yield from serve(week.config, tmp / "serve.log", None, "--store", url)


def test_the_fleets_postgresql_is_served_alike(week: Served, central: Served, visit: Visit) -> None:
    """The pages of the week read from PostgreSQL say what they say read from the SQLite store."""
    for path in ("/", "/outages", "/history", "/events"):
        here, there = week.json(path), central.json(path)
        if "store" in here:  # which store it is, said as the commands say it (a URL without its password)
            assert here["store"].endswith("week.db") and there["store"].startswith("postgresql://"), path
            here, there = (json.loads(json.dumps(f).replace(f["store"], "STORE")) for f in (here, there))
        assert there == here, path
    page = load(visit, central, "/outages", "central-outages")
    assert page.locator("table.outages tbody tr[data-verdict=tunnel_down]").count() == 1
