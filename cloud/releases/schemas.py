"""Request and response models of fleet updates: releases, rollouts and the machines' steps."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

import contract as p
from cloud.schemas import In

MAX_ROLLOUT_MACHINES = 10_000


class ReleaseOut(BaseModel):
    version: str
    sha256: str                      # of the whole bundle file
    size_bytes: int
    key_id: str                      # the release key that signed it
    manifest: dict[str, Any]         # min_version, device_types, created_ms, file_count, app_files, wheel_files, ...
    notes: str
    uploaded_by: str
    uploaded_ms: int
    withdrawn_ms: int | None


class ReleasesOut(BaseModel):
    releases: list[ReleaseOut]
    max_bundle_bytes: int


class RolloutIn(In):
    """Either the machines, or a percentage of the fleet (chosen by the rollout's id: the same machines every time
    it is read, other machines for another rollout)."""

    version: p.ReleaseVersion
    machine_ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]] | None,
                           Field(min_length=1, max_length=MAX_ROLLOUT_MACHINES)] = None
    percent: Annotated[int | None, Field(ge=1, le=100)] = None
    max_rollback_pct: Annotated[int, Field(ge=0, le=100)] = 20


class MachineStepOut(BaseModel):
    machine_id: str
    step: str                        # pending, or the machine's last reported step (contract.UPDATE_STEPS)
    reason: str
    detail: str
    running_version: str             # as the machine's report said
    heartbeat_version: str           # as its last heartbeat said
    updated_ms: int
    last_seen_ms: int | None


class RolloutOut(BaseModel):
    rollout_id: int
    version: str
    created_by: str
    created_ms: int
    state: str                       # active, paused, stopped, done
    machine_ids: list[str] | None
    percent: int | None
    max_rollback_pct: int
    stop_reason: str | None
    updated_ms: int
    counts: dict[str, int]           # machines per step
    machine_count: int
    machines: list[MachineStepOut] | None = None


class RolloutsOut(BaseModel):
    rollouts: list[RolloutOut]


class StepOut(BaseModel):
    step_id: int                     # the order the cloud received them in
    version: str                     # as the report said
    step: str                        # pending, or contract.UPDATE_STEPS
    reason: str
    detail: str                      # the latest repeat's
    running_version: str
    source: str                      # machine (its report), heartbeat (it came back running the version), cloud
    applied: bool                    # false: it did not move the current step (arrived late, or another version)
    repeats: int                     # the same step received again right after counts here
    at_ms: int                       # first received
    last_at_ms: int                  # last received


class MachineHistoryOut(BaseModel):
    """One machine's steps in a rollout, oldest first, and its current step."""

    rollout_id: int
    machine_id: str
    version: str
    step: str
    reason: str
    detail: str
    running_version: str
    updated_ms: int
    max_rows: int                    # the oldest rows beyond it are dropped
    steps: list[StepOut]


class ReportOut(BaseModel):
    recorded: bool                   # false: the current step did not move (not this machine's rollout or version,
                                     # or a step after healthy); a report of its rollout is kept in the history
