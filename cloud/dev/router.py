"""Development-only routes, included by :func:`cloud.app.create_app` only outside production mode: a user
with a balance, the development SMS sink's inbox, a QR shortcut for a browser next to the desktop simulation,
and the sandbox payment provider's pay page."""

from __future__ import annotations

import html
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse

import contract as p
from cloud.accounts.providers import DevSmsSink
from cloud.accounts.router import DEV_INBOX_COOKIE
from cloud.accounts.service import normalized_phone
from cloud.db import audit
from cloud.deps import Admin, MachinePath, Now, Svc
from cloud.dev.schemas import DevSmsOut, DevUserIn, DevUserOut
from cloud.dev.service import create_dev_user
from cloud.errors import ERRORS, Conflict, DomainError, Forbidden, NotFound, http_status
from cloud.pages import PAGE_HEADERS
from cloud.wallet.payments import SandboxPay

router = APIRouter(tags=["development"], responses=ERRORS)
OrderPath = Annotated[str, PathParam(max_length=40)]


@router.post("/api/v1/dev/users", response_model=DevUserOut)
def dev_user(body: DevUserIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """A user with a balance, without SMS login and top-up."""
    try:
        user_id, token = create_dev_user(svc.database, body.phone, body.balance_fen, body.registered, now)
    except Exception as e:
        raise Conflict("user_exists", f"a user with phone {body.phone} exists") from e
    with svc.database.tx() as conn:
        audit(conn, op["operator_id"], "dev_create_user", user_id, {"balance_fen": body.balance_fen}, now)
    return {"user_id": user_id, "token": token}


@router.get("/api/v1/dev/sms", response_model=DevSmsOut)
def dev_sms(phone: Annotated[str, Query(min_length=1, max_length=24)], request: Request, svc: Svc) -> dict[str, Any]:
    """The messages the development SMS sink 'sent' to a number (no real SMS is sent), shown only to the browser
    that asked for them."""
    sink = svc.accounts.sms
    if not isinstance(sink, DevSmsSink):
        raise Forbidden("not_development", "there is no development SMS sink on this server")
    messages = sink.messages_for(normalized_phone(phone), request.cookies.get(DEV_INBOX_COOKIE, ""))
    return {"note": "development SMS sink: not a real SMS gateway; only the browser that asked sees a code",
            "messages": messages}


@router.get("/dev/qr/{machine_id}", include_in_schema=False)
def dev_qr(machine_id: MachinePath, svc: Svc, now: Now) -> RedirectResponse:
    """Opens the page the machine's QR code opens right now (for a browser on the same computer as the desktop
    simulation). Never in production: presence must come from the machine's screen."""
    secret = svc.machines.secret(machine_id)
    if secret is None:
        raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
    return RedirectResponse(f"/m/{machine_id}?c={p.qr_code(secret, machine_id, now // 1000)}", status_code=307)


# ---------------------------------------------------------------- the sandbox payment provider's pages
sandbox_router = APIRouter(include_in_schema=False)


def _sandbox(svc: Svc) -> SandboxPay:
    sandbox = svc.wallet.providers["sandbox"]       # this router is included only with it
    assert isinstance(sandbox, SandboxPay)
    return sandbox


@sandbox_router.get("/sandbox-pay/{order_id}")
def sandbox_page(order_id: OrderPath, svc: Svc) -> HTMLResponse:
    o = _sandbox(svc).order(order_id)
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


@sandbox_router.post("/sandbox-pay/{order_id}/pay")
def sandbox_pay(order_id: OrderPath, svc: Svc, now: Now):
    try:
        o = _sandbox(svc).pay(order_id, now)
    except DomainError as e:
        return _sandbox_html("无法支付 Cannot pay", f"<p>{html.escape(e.message)}</p>", status=http_status(e))
    return RedirectResponse(o.return_url, status_code=303)      # the return itself credits nothing


@sandbox_router.post("/sandbox-pay/{order_id}/cancel")
def sandbox_cancel(order_id: OrderPath, svc: Svc):
    o = _sandbox(svc).order(order_id)
    return RedirectResponse(o.return_url if o else "/app#/wallet", status_code=303)


def _sandbox_html(title: str, body: str, status: int = 200) -> HTMLResponse:
    page = f"""<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/app.css"></head><body class="sandbox"><main>
<div class="banner warn">沙箱支付：不会扣任何真实款项。<br>Sandbox payment provider: no real money moves.</div>
<h1>{title}</h1>{body}</main></body></html>"""
    return HTMLResponse(page, status_code=status, headers=PAGE_HEADERS)
