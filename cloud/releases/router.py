"""Fleet updates: admins upload signed release bundles and roll them out; viewers watch; machines find the
offer in their heartbeat's answer (:mod:`cloud.devices.router`), download the bundle (resumable, with
``Range``) and report each step."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

import contract as p
from cloud.deps import Admin, Device, IdPath, Now, RowIdPath, Svc, Viewer
from cloud.errors import ERRORS, Err, Invalid, UnsupportedMedia
from cloud.releases.schemas import (
    MachineHistoryOut,
    ReleaseOut,
    ReleasesOut,
    ReportOut,
    RolloutIn,
    RolloutOut,
    RolloutsOut,
)
from cloud.releases.service import CHUNK_BYTES

router = APIRouter(prefix="/api/v1/operator", tags=["releases"], responses=ERRORS)
device_router = APIRouter(prefix="/device/v1", tags=["device"], responses=ERRORS)
VersionPath = Annotated[str, PathParam(pattern=r"^\d{1,6}(?:\.\d{1,6}){1,3}$", max_length=30)]
RANGE_RE = re.compile(r"^bytes=(\d{1,15})-(\d{0,15})$")


@router.post("/releases", response_model=ReleaseOut)
async def upload_release(request: Request, op: Admin, svc: Svc) -> dict[str, Any]:
    """The bundle file as the body (``application/octet-stream``), streamed to disk (at most
    ``contract.bundle.MAX_BUNDLE_BYTES``, 413 past it), then checked: 422 with the bundle's refusal code
    (unknown_key, bad_signature, tampered, malformed, unsupported_format), 409 for a version uploaded before with
    other bytes (the very same bytes again: 200)."""
    releases = svc.releases
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/octet-stream":
        raise UnsupportedMedia("content_type", "send the bundle file as application/octet-stream")
    length = request.headers.get("content-length")
    if length is not None:
        releases.check_size(int(length) if length.isdigit() else releases.max_bytes + 1)
    path, size = releases.new_upload(), 0
    try:
        with open(path, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                releases.check_size(size)
                await run_in_threadpool(fh.write, chunk)
        if size == 0:
            raise Invalid("empty", "the body is empty: send the bundle file")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return await run_in_threadpool(releases.accept, op["operator_id"], path, svc.now())


@router.get("/releases", response_model=ReleasesOut)
def list_releases(op: Viewer, svc: Svc) -> dict[str, Any]:
    return {"releases": svc.releases.releases(), "max_bundle_bytes": svc.releases.max_bytes}


@router.post("/releases/{version}/withdraw", response_model=ReleaseOut)
def withdraw_release(version: VersionPath, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """Offered and served no more; its rollouts that are not over are stopped (audited)."""
    return svc.releases.withdraw(op["operator_id"], version, now)


@router.post("/rollouts", response_model=RolloutOut)
def create_rollout(body: RolloutIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """409 ``machine_in_rollout`` while another rollout that is not over (active or paused) covers a machine."""
    return svc.releases.create_rollout(op["operator_id"], body.version, body.machine_ids, body.percent,
                                       body.max_rollback_pct, now)


@router.get("/rollouts", response_model=RolloutsOut)
def list_rollouts(op: Viewer, svc: Svc) -> dict[str, Any]:
    return {"rollouts": svc.releases.rollouts()}


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut)
def get_rollout(rollout_id: RowIdPath, op: Viewer, svc: Svc) -> dict[str, Any]:
    return svc.releases.rollout(rollout_id)


@router.get("/rollouts/{rollout_id}/machines/{machine_id}/steps", response_model=MachineHistoryOut)
def machine_steps(rollout_id: RowIdPath, machine_id: IdPath, op: Viewer, svc: Svc) -> dict[str, Any]:
    """Every step of one machine in the rollout as the cloud received them, oldest first, with those that
    arrived too late to move its current step; 404 ``no_rollout`` or ``no_machine`` (not in this rollout)."""
    return svc.releases.history(rollout_id, machine_id)


@router.post("/rollouts/{rollout_id}/{action}", response_model=RolloutOut)
def change_rollout(rollout_id: RowIdPath, action: Literal["pause", "resume", "stop"], op: Admin, svc: Svc,
                   now: Now) -> dict[str, Any]:
    return svc.releases.change_rollout(op["operator_id"], rollout_id, action, now)


BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@device_router.get("/releases/{version}/bundle", response_model=None, response_class=StreamingResponse,
                   responses={200: {"content": BINARY, "description": "the whole bundle"},
                              206: {"content": BINARY, "description": "the bytes the Range header asked for"},
                              416: {"model": Err, "description": "the Range starts past the end"}})
async def download_bundle(version: VersionPath, auth: Device, svc: Svc,
                          range: Annotated[str | None, Header()] = None) -> StreamingResponse | JSONResponse:
    """The bundle offered to this machine, streamed; ``Range: bytes=N-`` (or ``N-M``) resumes a download
    (206), a range past the end is 416."""
    path, size = await run_in_threadpool(svc.releases.bundle_for, auth.machine_id, version)
    start, end = 0, size - 1
    if range is not None:
        m = RANGE_RE.fullmatch(range.strip())
        start = int(m.group(1)) if m else size
        end = min(int(m.group(2)), size - 1) if m and m.group(2) else size - 1
        if start >= size or end < start:
            return JSONResponse({"error": "range_not_satisfiable",
                                 "message": f"the bundle has {size} bytes; ask for bytes=N- with N below that"},
                                status_code=416, headers={"Content-Range": f"bytes */{size}"})

    def chunks():
        with open(path, "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(CHUNK_BYTES, left))):
                left -= len(chunk)
                yield chunk

    headers = {"Content-Length": str(end - start + 1), "Accept-Ranges": "bytes"}
    if range is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks(), status_code=206 if range is not None else 200,
                             media_type="application/octet-stream", headers=headers)


@device_router.post("/update-report", response_model=ReportOut)
def update_report(body: p.UpdateReportMsg, auth: Device, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.releases.report(auth.machine_id, body, now)

