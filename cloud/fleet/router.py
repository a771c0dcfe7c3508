"""The console's fleet (every machine at a glance, filtered, sorted, paged or as CSV; a price for several machines)
and one machine's page (its facts, charts, event log, commands and sessions). The machine's own changes (price,
place, time zone, hotline, service, lockouts, keys) are the operators API's endpoints."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cloud.csvout import csv_response, iso_utc
from cloud.deps import MachinePath, Now, Operator, Svc, Viewer
from cloud.errors import ERRORS
from cloud.fleet.schemas import (
    BulkPriceIn,
    BulkPriceOut,
    FleetOut,
    MachineCommandsOut,
    MachineDetailOut,
    MachineEventsOut,
    MachineSessionsOut,
    SeriesOut,
)
from cloud.fleet.service import SORT_KEYS

router = APIRouter(prefix="/api/v1/operator/fleet", tags=["operator"], responses=ERRORS)
SortKey = Literal[SORT_KEYS]  # type: ignore[valid-type]
CSV_COLUMNS = ("machine_id", "site", "location", "online", "state", "lockouts", "open_alarms", "price_fen_per_l",
               "displayed_price_fen_per_l", "price_mismatch", "software_version", "outbox_depth", "dead_letters",
               "temp_c", "tds_ppm", "filter_used_permille", "uv_used_permille", "last_seen_utc")


@router.get("", response_model=FleetOut, responses={200: {"content": {"text/csv": {}}}})
def fleet(op: Viewer, svc: Svc, now: Now, q: Annotated[str, Query(max_length=100)] = "",
          online: Literal["", "online", "offline"] = "", state: Annotated[str, Query(max_length=32)] = "",
          site: Annotated[str, Query(max_length=100)] = "", has_alarms: bool = False, has_lockouts: bool = False,
          price_mismatch: bool = False, sort: SortKey = "machine_id", order: Literal["asc", "desc"] = "asc",
          offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100,
          format: Literal["json", "csv"] = "json") -> Any:
    """Every machine with what its heartbeats say: online or not, state, lockouts, open alarms, the price set and
    the one on its screen, software, outbox, temperature, TDS, filter and UV use. ``q`` searches machine id,
    location and site; ``format=csv`` downloads every matching row."""
    filters = {"q": q, "online": online, "state": state, "site": site, "has_alarms": has_alarms,
               "has_lockouts": has_lockouts, "price_mismatch": price_mismatch}
    found = svc.fleet.search(filters, sort, order == "desc", now)
    rows = found["rows"]
    if format == "csv":
        return csv_response("tapshare-fleet.csv", list(CSV_COLUMNS), (
            [*(csv_cell(r[k]) for k in CSV_COLUMNS[:-1]), iso_utc(r["last_seen_ms"])] for r in rows))
    return {"machines": rows[offset:offset + limit], "total": len(rows), "offset": offset, "limit": limit,
            "stats": found["stats"], "sites": found["sites"], "states": found["states"]}


@router.post("/price", response_model=BulkPriceOut)
def bulk_price(body: BulkPriceIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """One price for the machines given, all or none (an unknown machine: 404, nothing changed); each change is
    audited and sent to its machine."""
    ids = svc.fleet.set_price(op["operator_id"], body.machine_ids, body.price_fen_per_l, now)
    return {"machine_ids": ids, "price_fen_per_l": body.price_fen_per_l}


@router.get("/{machine_id}", response_model=MachineDetailOut)
def machine(machine_id: MachinePath, op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.fleet.machine(machine_id, now)


@router.get("/{machine_id}/series", response_model=SeriesOut)
def series(machine_id: MachinePath, op: Viewer, svc: Svc, now: Now,
           range: Literal["24h", "7d"] = "24h") -> dict[str, Any]:
    """Temperature and TDS as sampled from heartbeats, and litres per hour of the machine's clock."""
    return svc.fleet.series(machine_id, range, now)


@router.get("/{machine_id}/events", response_model=MachineEventsOut)
def events(machine_id: MachinePath, op: Viewer, svc: Svc, offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
           limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    """The machine's event log, newest first."""
    return svc.fleet.events(machine_id, offset, limit)


@router.get("/{machine_id}/commands", response_model=MachineCommandsOut)
def commands(machine_id: MachinePath, op: Viewer, svc: Svc,
             limit: Annotated[int, Query(ge=1, le=200)] = 30) -> dict[str, Any]:
    """Commands sent to the machine, newest first: delivered, acknowledged, refused with the reason."""
    return {"commands": svc.fleet.commands(machine_id, limit)}


@router.get("/{machine_id}/sessions", response_model=MachineSessionsOut)
def sessions(machine_id: MachinePath, op: Viewer, svc: Svc,
             limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
    return {"sessions": svc.fleet.sessions(machine_id, limit)}


def csv_cell(v: Any) -> Any:
    """Lists joined with ';', booleans as true / false."""
    return ";".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v
