"""The dashboard's Starlette application: a route per page, each page's facts from pages.py
shown through a Jinja2 template or served as JSON (`?format=json` or `Accept:
application/json`), read-only.

Endpoints are plain functions: Starlette runs them in its thread pool, so the pandas work of
one page never holds up the server's loop. A page's facts are kept (cache.py) until the store
changes and made again in the background after, so a page over a year of data costs the
analysis once, not at every request; the pages without parameters are made as it starts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import click
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from probe.config import Config
from probe.errors import ConfigError, TunnelwatchError

from ..options import When
from . import draw, pages
from .cache import Pages
from .figures import CHARTS, history_charts

TEMPLATES = Path(__file__).parent / "templates"
REFRESH_S = 60  # the Now page reloads itself this often
NAV = [("/", "Now"), ("/history", "History"), ("/outages", "Outages"), ("/events", "Events"), ("/reports", "Reports")]


def _when(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        return When().convert(value, None, None)
    except click.BadParameter as exc:
        raise HTTPException(400, f"{param}: {exc.message}") from None


# The collector's first threshold in `serve` (set by serve_cli.py for its process, not here:
# the tests' process keeps Python's): a page allocates millions of objects and frees
# nearly all of them by their count of references; at Python's 700, a year's History page ran
# some 70 young collections and, every other page, a full one (0.09 s): 0.085 s a page in all.
GC_THRESHOLD = 10_000


def read_summaries(cfg: Config) -> None:
    """The store's summaries read into memory, the raw rows after their cursor summarised
    (ranges.Held.tail: until more rows come, every page takes it), and everything made so far
    (the imports, the summaries) moved out of the collector's sight: otherwise nearly every
    page paid a full collection that walked it all (0.07-0.15 s of a year's History page;
    0.014 s frozen)."""
    held = pages.held(cfg)
    if (cursor := held.refresh()) is not None:
        held.tail(cursor, None, cfg.probe.interval_s)
    gc.collect()
    gc.freeze()


def _wants_json(request: Request) -> bool:
    if request.query_params.get("format") == "json":
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _time(value: str | None, seconds: bool = False) -> str:
    """An ISO time as the pages show it: UTC, to the minute (or second)."""
    if not value:
        return ""
    moment = datetime.fromisoformat(value)
    return f"{moment:%Y-%m-%d %H:%M{':%S' if seconds else ''}}Z"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, str) and len(value) >= 19 and value[10] == "T" and value[4] == "-":
        return _time(value)
    return str(value)


def build_app(cfg: Config, *, credentials: tuple[str, str] | None = None, warm: bool = True) -> Starlette:
    """The dashboard over `cfg`'s store (analysis.store or store.path, as the analysis
    commands read); with `credentials`, every page asks for them (HTTP basic). With `warm`,
    the pages without parameters are made in the background as the server starts."""
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.filters["when"] = _time
    templates.env.filters["cell"] = _cell
    kept = Pages(cfg)

    def show(request: Request, template: str, data: dict[str, Any], **more: Any) -> Response:
        if _wants_json(request):
            return JSONResponse(data)
        context = {"page": data, "nav": NAV, "here": request.url.path, "vantage": cfg.vantage.name, **more}
        return templates.TemplateResponse(request, template, context)

    def make_history(since: datetime | None, until: datetime | None, path: str | None) -> dict[str, Any]:
        chosen = pages.default_range(cfg, since, until, pages.HISTORY_DAYS)
        if chosen is None:
            return {"facts": {"since": None, "until": None, "path": path, "outages": []}, "charts": {}}
        charts, facts = history_charts(cfg, chosen, path, "svg")
        query = urlencode(
            {"since": chosen.since.isoformat(), "until": chosen.until.isoformat(), **({"path": path} if path else {})}
        )
        facts = {**facts, "charts": {name: f"/history/{name}.svg?{query}" for name in CHARTS}}
        return {"facts": facts, "charts": charts}

    def make_pngs(since: datetime | None, until: datetime | None, path: str | None) -> dict[str, str | bytes]:
        """The range's three charts as PNG, made together and kept: one analysis for the three."""
        chosen = pages.default_range(cfg, since, until, pages.HISTORY_DAYS)
        if chosen is None:
            return {}
        return history_charts(cfg, chosen, path, "png")[0]

    # the pages without parameters, made in the background as the server starts, after the
    # summaries are read
    defaults: list[tuple[tuple[Any, ...], Callable[[], Any]]] = [
        (("summaries",), lambda: read_summaries(cfg)),
        (("now",), lambda: pages.now_page(cfg)),
        (("outages", None, None, None), lambda: pages.outages_page(cfg, None, None, None)),
        (("history", None, None, None), lambda: make_history(None, None, None)),
        (("events", None, None), lambda: pages.events_page(cfg, None, None)),
    ]

    def now(request: Request) -> Response:
        data = kept.get(("now",), lambda: pages.now_page(cfg))
        return show(request, "now.html", data, refresh_s=REFRESH_S)

    def history(request: Request) -> Response:
        since, until = (
            _when(request.query_params.get("since"), "since"),
            _when(request.query_params.get("until"), "until"),
        )
        path = request.query_params.get("path") or None
        made = kept.get(("history", since, until, path), lambda: make_history(since, until, path))
        return show(request, "history.html", made["facts"], charts=made["charts"])

    def chart(request: Request) -> Response:
        name, fmt = request.path_params["name"], request.path_params["fmt"]
        if name not in CHARTS or fmt not in ("svg", "png"):
            raise HTTPException(404, f"no chart {name}.{fmt}; the charts: {', '.join(CHARTS)} as .svg or .png")
        since, until = (
            _when(request.query_params.get("since"), "since"),
            _when(request.query_params.get("until"), "until"),
        )
        path = request.query_params.get("path") or None
        if fmt == "svg":  # the History page's own, kept
            made = kept.get(("history", since, until, path), lambda: make_history(since, until, path))
            if name not in made["charts"]:
                raise HTTPException(404, "no measurements stored yet")
            return Response(made["charts"][name], media_type="image/svg+xml")
        made = kept.get(("history.png", since, until, path), lambda: make_pngs(since, until, path))
        if name not in made:
            raise HTTPException(404, "no measurements stored yet")
        return Response(made[name], media_type="image/png")

    def outages(request: Request) -> Response:
        since, until = (
            _when(request.query_params.get("since"), "since"),
            _when(request.query_params.get("until"), "until"),
        )
        path = request.query_params.get("path") or None
        data = kept.get(("outages", since, until, path), lambda: pages.outages_page(cfg, since, until, path))
        return show(request, "outages.html", _sorted(data, request))

    def rounds(request: Request) -> Response:
        since = _when(request.query_params.get("since"), "since")
        if since is None:
            raise HTTPException(400, "since: the start of the round's slot is needed, e.g. ?since=2018-03-06T02:00Z")
        path = request.query_params.get("path") or None
        data = kept.get(("rounds", since, path), lambda: pages.round_page(cfg, since, path))
        return show(request, "rounds.html", data)

    def events(request: Request) -> Response:
        since, until = (
            _when(request.query_params.get("since"), "since"),
            _when(request.query_params.get("until"), "until"),
        )
        data = kept.get(("events", since, until), lambda: pages.events_page(cfg, since, until))
        return show(request, "events.html", _sorted(data, request))

    def reports(request: Request) -> Response:
        return show(request, "reports.html", pages.reports_page(cfg))

    def report(request: Request) -> Response:
        name = request.path_params["name"]
        for file in pages.report_files(cfg):
            if file.name == name:  # only the listed files: a name is never a path
                return FileResponse(file)
        raise HTTPException(404, f"no report {name!r} in {cfg.report.directory}")

    async def failed(request: Request, exc: Exception) -> Response:
        status, message = (exc.status_code, exc.detail) if isinstance(exc, HTTPException) else (503, str(exc))
        if isinstance(exc, ConfigError):
            status = 400  # a range or a name asked for that cannot be
        if _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        context = {"page": {"error": message}, "nav": NAV, "here": request.url.path, "vantage": cfg.vantage.name}
        return templates.TemplateResponse(request, "error.html", context, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if warm:
            for key, make in defaults:
                kept.refresh(key, make)
        yield
        kept.close()
        draw.close()  # uvicorn ends the process by SIGTERM again after this: atexit would not run

    middleware = [Middleware(BaseHTTPMiddleware, dispatch=_basic_auth(credentials))] if credentials else []
    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", now),
            Route("/history", history),
            Route("/history/{name}.{fmt}", chart),
            Route("/outages", outages),
            Route("/rounds", rounds),
            Route("/events", events),
            Route("/reports", reports),
            Route("/reports/{name}", report),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: failed, TunnelwatchError: failed},
    )


SORT_BY = {"duration": "minutes"}  # a column shown as text, ordered by the number beside it


def _sorted(data: dict[str, Any], request: Request) -> dict[str, Any]:
    """The table's rows ordered by ?sort=COLUMN (&desc=1), empty cells last."""
    column = request.query_params.get("sort")
    if not column or column not in data.get("columns", ()):
        return data
    desc = request.query_params.get("desc") == "1"
    filled = [r for r in data["rows"] if r.get(column) is not None]
    empty = [r for r in data["rows"] if r.get(column) is None]
    by = SORT_BY.get(column, column)
    filled.sort(key=lambda r: _cell(r[by]) if not isinstance(r[by], (int, float)) else r[by], reverse=desc)
    return {**data, "rows": filled + empty, "sort": column, "desc": desc}


def _basic_auth(
    credentials: tuple[str, str],
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    expected = (credentials[0].encode(), credentials[1].encode())

    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            user = password = b""
        # both compared, always: the time taken says nothing about which one was wrong
        user_ok = secrets.compare_digest(user, expected[0])
        if scheme.lower() == "basic" and secrets.compare_digest(password, expected[1]) and user_ok:
            return await call_next(request)
        return Response(
            "authentication required\n", 401, {"WWW-Authenticate": 'Basic realm="tunnelwatch", charset="UTF-8"'}
        )

    return check
