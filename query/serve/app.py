"""The explorer's ASGI application: Starlette routes over a store opened read-only, Jinja2 templates with
autoescaping, the package's own static folder, and security headers on every answer.

Read-only by construction: the store is opened with `read_only=True` (SQLite `mode=ro`, PostgreSQL read-only
transactions) and the SQL page goes through the same read-only door as `actdb sql`; every route is a GET."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actdb.query.serve import pages
from actdb.query.serve.site import Site
from actdb.query.text_activations import LoadedModels
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store

HERE = Path(__file__).resolve().parent
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
log = logging.getLogger("actdb.serve")


class SecurityHeaders:
    """Adds the Content-Security-Policy and its companions to every HTTP answer (errors and static files too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def templates() -> Environment:
    """Jinja2 with autoescaping on for every template: token text holding markup shows as text."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pages.FILTERS)
    return env


def _error_page(site: Site, request: Request, status: int, message: str) -> HTMLResponse:
    html = site.env.get_template("error.html").render(status=status, message=message, request=request)
    return HTMLResponse(html, status_code=status)


def create_app(
    config: StoreConfig, device: str = "auto", max_loaded: int | None = None, warm: bool = True
) -> Starlette:
    """The explorer over the store at `config`, opened read-only (a missing or outdated store is an ActdbError
    here, before anything listens); with `warm`, the whole-store results are read in a background thread."""
    store = Store.open(config, read_only=True)
    loaded = LoadedModels(device=device) if max_loaded is None else LoadedModels(max_loaded, device)
    site = Site(store, templates(), loaded)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error_page(site, request, exc.status_code, exc.detail or "")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error_page(site, request, 500, "the page failed; the server log names the error")

    routes = [Route(path, pages.bind(site, handler), name=name) for path, handler, name in pages.ROUTES]
    routes.append(Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.site = site
    if warm:
        threading.Thread(target=pages.warm_caches, args=(site,), name="actdb-serve-warm", daemon=True).start()
    return app
