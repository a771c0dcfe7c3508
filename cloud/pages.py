"""The phone pages: a small single-page app in cloud/static/, served here. Pages carry a strict
Content-Security-Policy and never leak the QR code in a Referer header."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from cloud.deps import MachinePath

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
router = APIRouter(include_in_schema=False)


def spa() -> FileResponse:
    return FileResponse(STATIC / "app.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/m/{machine_id}")
def machine_page(machine_id: MachinePath) -> FileResponse:
    """What the machine's QR code opens (``/m/<machine>?c=<code>``)."""
    return spa()


@router.get("/app")
def app_page() -> FileResponse:
    return spa()


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/app", status_code=307)
