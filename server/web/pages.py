"""Herald's own web pages and the browser client they (and customers) load.

The agent console and the demo pages are plain files: no template, no
build, nothing computed per request, so they can be cached and reviewed as
they are. Only a fixed list of files is served (no directory is exposed),
and every page gets a Content-Security-Policy that allows scripts and
connections to this origin alone, so a page that leaked into a foreign
frame or met injected markup still cannot talk to anyone else.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from herald_presence import protocol

from .http_common import Handler

JS_DIR = Path(protocol.__file__).resolve().parent / "client" / "js"
STATIC_DIR = Path(__file__).resolve().parent / "static"

JS = "text/javascript"
# URL path -> (file, content type). The client is stable at /js/herald.js and
# imports ./vendor/msgpack.mjs relatively, so the same tree works from a CDN.
FILES: dict[str, tuple[Path, str]] = {
    "/": (STATIC_DIR / "index.html", "text/html"),  # what is here, and in demo mode the demo pages
    "/js/herald.js": (JS_DIR / "herald.js", JS),
    "/js/vendor/msgpack.mjs": (JS_DIR / "vendor" / "msgpack.mjs", JS),
    "/js/vendor/msgpack.LICENSE": (JS_DIR / "vendor" / "msgpack.LICENSE", "text/plain"),
    "/console": (STATIC_DIR / "console.html", "text/html"),
    "/demo/visitor": (STATIC_DIR / "visitor.html", "text/html"),
    "/demo/shortcode": (STATIC_DIR / "shortcode.html", "text/html"),
    "/static/pages.css": (STATIC_DIR / "pages.css", "text/css"),
    "/static/pages.js": (STATIC_DIR / "pages.js", JS),
    "/static/index.js": (STATIC_DIR / "index.js", JS),
    "/static/console.js": (STATIC_DIR / "console.js", JS),
    "/static/visitor.js": (STATIC_DIR / "visitor.js", JS),
    "/static/shortcode.js": (STATIC_DIR / "shortcode.js", JS),
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _file_handler(url: str, path: Path, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        headers = {
            "Content-Type": f"{content_type}; charset=utf-8",
            # Revalidate every time (cheap with ETag/Last-Modified): an upgraded
            # server must never be paired with a page or client cached from the old one.
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if content_type == "text/html":
            headers |= {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}
        elif url.startswith("/js/"):
            # A customer's site imports the client from Herald's origin: module
            # scripts load cross-origin only with CORS. The files are public.
            headers["Access-Control-Allow-Origin"] = "*"
        return web.FileResponse(path, headers=headers)

    return serve


def add_routes(app: web.Application) -> None:
    for url, (path, content_type) in FILES.items():
        app.router.add_get(url, _file_handler(url, path, content_type))
