"""The dispensers' API (signed requests, :mod:`contract.signing`): the server's time, enrolment, the command
long-poll and its acknowledgements, event reports, live progress and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

import contract as p
from cloud.deps import Device, IdPath, Now, Svc
from cloud.devices.schemas import EnrollIn, EnrollOut
from cloud.errors import ERRORS
from cloud.schemas import OkOut

log = logging.getLogger("tapshare.cloud")
router = APIRouter(prefix="/device/v1", tags=["device"], responses=ERRORS)
LONG_POLL_MAX_S = 60.0


@router.get("/time", response_model=p.TimeResponse)
def server_time(now: Now) -> p.TimeResponse:
    """Unsigned: a device with a wrong clock needs this before it can sign anything."""
    return p.TimeResponse(server_time_ms=now)


@router.post("/enroll", response_model=EnrollOut)
def enroll(body: EnrollIn, svc: Svc, now: Now) -> dict[str, Any]:
    secret = svc.machines.enroll(body.machine_id, body.enrolment_token, now)
    return {"machine_id": body.machine_id, "secret_hex": secret.hex(),
            "note": "store this secret on the machine now; it is not shown again"}


@router.get("/commands", response_model=p.CommandsResponse)
async def poll_commands(auth: Device, svc: Svc,
                        wait_ms: Annotated[int, Query(ge=0, le=int(LONG_POLL_MAX_S * 1000))] = 25_000
                        ) -> p.CommandsResponse:
    """Long-poll: returns at once if commands are waiting, else when one is queued or ``wait_ms`` passes."""
    hub, commands = svc.hub, svc.commands
    svc.presence.polling(auth.machine_id, wait_ms, svc.now())      # reachable, for every instance
    async with hub.polling(auth.machine_id) as ev:
        cmds, again_ms = [], None
        if auth.machine_id in commands.maybe_pending:
            cmds, again_ms = await run_in_threadpool(commands.pending, auth.machine_id, svc.now())
        if not cmds and wait_ms and not hub.closing:
            # wait for a new command, or until one handed out earlier and never acknowledged is due again
            wait_s = wait_ms / 1000 if again_ms is None else min(wait_ms / 1000, max(0.0, again_ms - svc.now()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), wait_s)
            # woken by a command (marked maybe pending before the wake), or one handed out earlier is due again;
            # woken because this instance is stopping, it answers at once without reading: every held poll of
            # a stopping instance wakes together, and 3,000 reads then outlasted the graceful shutdown
            if (ev.is_set() and auth.machine_id in commands.maybe_pending) or again_ms is not None:
                cmds, _ = await run_in_threadpool(commands.pending, auth.machine_id, svc.now())
    return p.CommandsResponse(commands=cmds, server_time_ms=svc.now())


@router.post("/commands/{command_id}/ack", response_model=p.AckResult)
def ack_command(command_id: IdPath, body: p.AckMsg, auth: Device, svc: Svc, now: Now) -> p.AckResult:
    """The machine's answer to a command; for a start, its claim (409 ``start_void``: do not pour)."""
    return svc.sessions.ack(auth.machine_id, command_id, body, now)


@router.post("/events", response_model=p.EventBatchResult)
def post_events(body: p.EventBatch, auth: Device, svc: Svc, now: Now) -> p.EventBatchResult:
    """Reports from the machine's outbox; a session's end is settled by :mod:`cloud.sessions`."""
    return p.EventBatchResult(results=svc.sessions.receive_events(auth.machine_id, body, now), server_time_ms=now)


@router.post("/progress", response_model=OkOut)
def post_progress(body: p.ProgressMsg, auth: Device, svc: Svc) -> dict[str, Any]:
    svc.sessions.progress(auth.machine_id, body)
    return {"ok": True}


@router.post("/heartbeat", response_model=p.HeartbeatResponse, response_model_exclude_none=True)   # no "update": null
def post_heartbeat(body: p.HeartbeatMsg, auth: Device, svc: Svc, now: Now) -> p.HeartbeatResponse:
    """Telemetry in; the machine's settings (price shown, time zone, hotline) out, and the release its rollout
    offers it, if any (:mod:`cloud.releases`)."""
    m = svc.machines.heartbeat(auth.machine_id, body, now)
    for sid in svc.sessions.reconcile(auth.machine_id, body, auth.timestamp_ms, now):
        log.warning("session %s lost: machine %s says it has no such session", sid, auth.machine_id)
    return p.HeartbeatResponse(server_time_ms=now, settings=p.MachineSettingsMsg(
        price_fen_per_l=m["price_fen_per_l"], timezone=m["timezone"], hotline=m["hotline"]),
        update=svc.releases.offer(auth.machine_id, body.software_version, now))
