"""The phone pages (a small single-page app in cloud/static/, served here) and the sandbox payment
provider's pay page. Pages carry a strict Content-Security-Policy and never leak the QR code in a
Referer header."""


import html
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

import contract as p
from cloud.payments import PaymentProvider, SandboxPay
from cloud.service import ApiError

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_pages(app: FastAPI, settings, pay: PaymentProvider, now: Callable[[], int], machines=None) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    MachinePath = Annotated[str, PathParam(max_length=64, pattern=p.MACHINE_ID_RE.pattern)]

    def spa() -> FileResponse:
        return FileResponse(STATIC / "app.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/m/{machine_id}", include_in_schema=False)
    def machine_page(machine_id: MachinePath) -> FileResponse:
        """What the machine's QR code opens (``/m/<machine>?c=<code>``)."""
        return spa()

    @app.get("/app", include_in_schema=False)
    def app_page() -> FileResponse:
        return spa()

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/app", status_code=307)

    @app.get("/dev/qr/{machine_id}", include_in_schema=False)
    def dev_qr(machine_id: MachinePath) -> RedirectResponse:
        """Development only: opens the page the machine's QR code opens right now (for a browser on the
        same computer as the desktop simulation). Production mode refuses: presence must come from the
        machine's screen."""
        if settings.production or machines is None:
            raise ApiError(403, "production", "there is no QR shortcut in production mode")
        secret = machines.secret(machine_id)
        if secret is None:
            raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
        code = p.qr_code(secret, machine_id, now() // 1000)
        return RedirectResponse(f"/m/{machine_id}?c={code}", status_code=307)

    if not isinstance(pay, SandboxPay):
        return
    sandbox = pay

    @app.get("/sandbox-pay/{order_id}", include_in_schema=False)
    def sandbox_page(order_id: Annotated[str, PathParam(max_length=40)]) -> HTMLResponse:
        o = sandbox.order(order_id)
        if o is None:
            return _sandbox_html("未知订单 Unknown order",
                                 "<p>支付方不知道这个订单。<br>The provider does not know this order.</p>", status=404)
        state = {"unpaid": "待支付 Unpaid", "paid": "已支付 Paid", "closed": "已关闭 Closed"}[o.state]
        yuan = f"{o.amount_fen / 100:.2f}"
        body = (f'<p class="amt">¥{yuan}</p><p>{html.escape(o.description)}</p><p>订单 Order: <code>'
                f'{html.escape(o.order_id)}</code><br>状态 State: <b id="state">{state}</b></p>')
        if o.state == "unpaid":
            body += (f'<form method="post" action="/sandbox-pay/{o.order_id}/pay"><button id="pay" class="pay">'
                     f'确认支付 Pay ¥{yuan}</button></form>'
                     f'<form method="post" action="/sandbox-pay/{o.order_id}/cancel"><button id="cancel" '
                     f'class="cancel">取消 Cancel</button></form>')
        return _sandbox_html("沙箱支付 Sandbox payment", body)

    @app.post("/sandbox-pay/{order_id}/pay", include_in_schema=False)
    def sandbox_pay(order_id: Annotated[str, PathParam(max_length=40)]):
        try:
            o = sandbox.pay(order_id, now())
        except ApiError as e:
            return _sandbox_html("无法支付 Cannot pay", f"<p>{html.escape(e.message)}</p>", status=e.status)
        return RedirectResponse(o.return_url, status_code=303)      # the return itself credits nothing

    @app.post("/sandbox-pay/{order_id}/cancel", include_in_schema=False)
    def sandbox_cancel(order_id: Annotated[str, PathParam(max_length=40)], request: Request):
        o = sandbox.order(order_id)
        return RedirectResponse(o.return_url if o else "/app#/wallet", status_code=303)


def _sandbox_html(title: str, body: str, status: int = 200) -> HTMLResponse:
    page = f"""<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/app.css"></head><body class="sandbox"><main>
<div class="banner warn">沙箱支付：不会扣任何真实款项。<br>Sandbox payment provider: no real money moves.</div>
<h1>{title}</h1>{body}</main></body></html>"""
    return HTMLResponse(page, status_code=status, headers=PAGE_HEADERS)
