"""/docs and /redoc with a restrictive Content-Security-Policy (or no docs at all).

FastAPI's pages load Swagger UI / ReDoc from a CDN and (Swagger) start it with one inline script.
The policy allows exactly that: scripts from the CDN plus the inline script by its sha256, the
spec from this origin, nothing else; no framing, no forms, no base URI. ``VIDRANK_DOCS=false``
removes both pages and /openapi.json (see ``create_app``).
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

CDN = "https://cdn.jsdelivr.net"
FAVICON_HOST = "https://fastapi.tiangolo.com"
DOC_PATHS = frozenset({"/docs", "/redoc"})
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
_COMMON = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def inline_script_hashes(html: bytes) -> list[str]:
    """CSP source expressions (``'sha256-...'``) of the page's inline scripts."""
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
        for m in _INLINE_SCRIPT.finditer(html)
    ]


def _page(page: HTMLResponse, *directives: str) -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its headers: ``_COMMON`` plus ``directives`` as the policy."""
    return bytes(page.body), {"Content-Security-Policy": "; ".join((_COMMON, *directives))}


def docs_router(title: str, openapi_url: str) -> APIRouter:
    """GET /docs (Swagger UI) and /redoc, each with its own policy."""
    router = APIRouter(include_in_schema=False)
    swagger = get_swagger_ui_html(openapi_url=openapi_url, title=f"{title} - Swagger UI")
    swagger_page = _page(
        swagger,
        f"script-src {CDN} {' '.join(inline_script_hashes(bytes(swagger.body)))}",
        f"style-src {CDN} 'unsafe-inline'",  # Swagger UI sets style attributes
        f"img-src 'self' data: {FAVICON_HOST}",
        "connect-src 'self'",
    )
    redoc_page = _page(
        get_redoc_html(openapi_url=openapi_url, title=f"{title} - ReDoc"),
        f"script-src {CDN}",
        "style-src https://fonts.googleapis.com 'unsafe-inline'",
        "font-src https://fonts.gstatic.com",
        f"img-src 'self' data: {FAVICON_HOST}",
        "connect-src 'self'",
        "worker-src blob:",  # ReDoc searches in a worker built from a blob
    )

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return HTMLResponse(swagger_page[0], headers=swagger_page[1])

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return HTMLResponse(redoc_page[0], headers=redoc_page[1])

    return router
