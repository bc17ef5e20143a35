"""``/ui``: the web page, served by the API itself (no separate front-end server).

One HTML page, one script and one style sheet from ``service/static/ui/`` (plain HTML, CSS and
JavaScript: no framework, nothing from a CDN, so it works offline). The page calls the same
public API a program does, with the API key the user typed (kept in ``sessionStorage``), and
draws images it fetched with that key as blob URLs, since an ``<img src>`` cannot send a key.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

__all__ = ["router", "UI_DIR", "CSP"]

router = APIRouter(tags=["ui"], include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
# Everything from this origin only; images also as blob: (fetched with the key) and data: (inference).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


@router.get("/", name="root")
def root() -> RedirectResponse:
    # Relative: behind a proxy that serves the API under a prefix, the page is under it too.
    return RedirectResponse("ui", status_code=307)


@router.get("/ui", name="web_page")
def web_page() -> FileResponse:
    """The page; which view it shows (new job, a job, the job list, pairs) is in the URL's
    fragment, so this one route serves them all."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
