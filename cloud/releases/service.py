"""Fleet updates, the cloud's side: release bundles an admin uploads (checked against the trusted release keys
before they are kept), rollouts of one to chosen machines or a percentage of the fleet, the offer each targeted
machine finds in its heartbeat's answer, the bundle it downloads (resumable), and the steps it reports.

A rollout stops by itself when too many of the machines that got as far as switching rolled back
(``max_rollback_pct``; a machine that failed before switching, a download or an install, is shown but not
counted: it still runs its old release), and raises an operator alarm: a release that breaks machines must
not reach the rest. It is done when every machine it targets is healthy.

Race safety: every change to a rollout and its machines' steps happens under the rollout's lock
(:meth:`cloud.db.Database.lock`; SQLite's writers are serial anyway), so two reports arriving together at two
instances are judged one after the other and the second sees the first.

History: ``machine_updates`` holds each machine's current step; ``machine_update_steps`` every step received, in
the order it arrived, written in the same transaction. A machine sends its reports one at a time from a queue on
disk, so its own rows are in its own order; but the heartbeat that marks it healthy may overtake its ``switched``
report. That late report does not move the current step back (``applied`` false) and is still kept, with its
detail and time: an operator asking why a machine rolled back, or how long it waited to be idle, sees every step.
The same step received again right after is one row (``repeats``, ``last_at_ms``), and a machine keeps at most
``HISTORY_ROWS`` rows per rollout (the oldest go), so a machine that stays busy for days does not grow it. The
steps of a rollout that ended are deleted ``update_history_days`` later (:meth:`Releases.prune_history`, the
cloud's minute prune); each machine's outcome stays."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

import contract as p
from cloud import db as t
from cloud.db import Database, audit, first_row, raise_alarm
from cloud.errors import Conflict, Invalid, NotFound, TooLarge
from contract import bundle as b

log = logging.getLogger("tapshare.cloud")

OPEN = ("active", "paused")                                    # a rollout that still covers its machines
ENDED_STEPS = ("refused", "rolled_back", "failed", "healthy")  # nothing more is offered to the machine
REACHED_SWITCH = ("switched", "healthy", "rolled_back")
STEPS = ("pending", *p.UPDATE_STEPS)
CHUNK_BYTES = 256 * 1024
r_ = t.releases.c
ro = t.rollouts.c
mu = t.machine_updates.c
hs = t.machine_update_steps.c
HISTORY_ROWS = 50                  # per machine and rollout: the newest are kept
SOURCES = ("machine", "heartbeat", "cloud")


def selected(rollout_id: int, machine_id: str, percent: int) -> bool:
    """Whether a percent rollout takes the machine: stable for the rollout, independent between rollouts."""
    digest = hashlib.sha256(f"{rollout_id}:{machine_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def bundle_url(version: str) -> str:
    return f"/device/v1/releases/{version}/bundle"


# what a heartbeat's answer offers (asked at every heartbeat), built once
_OFFERED = (select(mu.rollout_id, mu.step, ro.version, ro.state, r_.sha256, r_.size_bytes)
            .join(t.rollouts, ro.rollout_id == mu.rollout_id).join(t.releases, r_.version == ro.version)
            .where(and_(mu.machine_id == bindparam("machine_id"), ro.state.in_(OPEN), r_.withdrawn_ms.is_(None))))


class Releases:
    def __init__(self, db: Database, data_dir: Path, keys_dir: Path, max_bytes: int = b.MAX_BUNDLE_BYTES) -> None:
        self.db, self.keys_dir, self.max_bytes = db, Path(keys_dir), max_bytes
        self.dir = Path(data_dir) / "releases"

    # ------------------------------------------------------------ releases

    def trusted_keys(self) -> list:
        """The release keys' public halves (``*.pub.pem`` in the keys directory), read at each upload so a key
        added or removed counts at once. A file that is not an Ed25519 public key is logged and left out."""
        keys = []
        for path in sorted(self.keys_dir.glob("*.pub.pem")) if self.keys_dir.is_dir() else []:
            try:
                keys.append(b.load_public_key(path.read_bytes()))
            except (b.BundleRefused, OSError) as e:
                log.error("release key %s left out: %s", path, e)
        return keys

    def bundle_path(self, version: str) -> Path:
        return self.dir / f"{version}.bundle"

    def new_upload(self) -> Path:
        """Where an upload is written while it arrives (next to the bundles, so keeping it is a rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        return self.dir / f".upload-{uuid.uuid4().hex}"

    def check_size(self, size_bytes: int) -> None:
        if size_bytes > self.max_bytes:
            raise TooLarge("bundle_too_large", f"a release bundle is at most {self.max_bytes} bytes")

    def accept(self, operator_id: str, upload: Path, now_ms: int) -> dict[str, Any]:
        """Keep an uploaded bundle if a trusted key signed it and every file is as signed (422 with the bundle's
        refusal code otherwise). The same version again is accepted only as the very same bytes (409 else).
        The upload file is gone afterwards either way."""
        try:
            os.chmod(upload, 0o600)
            h, size = hashlib.sha256(), 0
            with open(upload, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                fh.seek(0)
                try:
                    manifest = b.verify_bundle(fh, self.trusted_keys())
                except b.BundleRefused as e:
                    raise Invalid(e.code, e.message) from None
            with open(upload, "rb") as fh:
                kid = _key_id(fh)
            sha256 = h.hexdigest()
            summary = _summary(manifest)
            with self.db.tx() as conn:
                self.db.lock(conn, f"release:{manifest.version}")
                have = first_row(conn, select(t.releases).where(r_.version == manifest.version))
                if have is not None:
                    if have["sha256"] != sha256:
                        raise Conflict("version_exists", f"release {manifest.version} was uploaded already, with "
                                                         "other contents: give the new one a new version")
                    return _release_out(have)
                row = {"version": manifest.version, "sha256": sha256, "size_bytes": size, "key_id": kid,
                       "manifest": summary, "notes": manifest.notes, "uploaded_by": operator_id,
                       "uploaded_ms": now_ms, "withdrawn_ms": None}
                try:
                    conn.execute(insert(t.releases).values(**row))
                except IntegrityError:
                    raise Conflict("version_exists", f"release {manifest.version} is being uploaded already") from None
                audit(conn, operator_id, "release_upload", manifest.version,
                      {"sha256": sha256, "size_bytes": size, "key_id": kid}, now_ms)
                os.replace(upload, self.bundle_path(manifest.version))     # kept only with its row
            log.info("release %s uploaded by %s (%d bytes)", manifest.version, operator_id, size)
            return _release_out(row)
        finally:
            upload.unlink(missing_ok=True)

    def releases(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(select(t.releases).order_by(r_.uploaded_ms.desc())).mappings().all()
        return [_release_out(dict(x)) for x in rows]

    def withdraw(self, operator_id: str, version: str, now_ms: int) -> dict[str, Any]:
        """No more offers or downloads of it; its open rollouts are stopped."""
        with self.db.tx() as conn:
            have = first_row(conn, select(t.releases).where(r_.version == version))
            if have is None:
                raise NotFound("no_release", f"no release {version}")
            if have["withdrawn_ms"] is None:
                conn.execute(update(t.releases).where(r_.version == version).values(withdrawn_ms=now_ms))
                have["withdrawn_ms"] = now_ms
                for rid in conn.execute(select(ro.rollout_id).where(and_(ro.version == version,
                                                                         ro.state.in_(OPEN)))).scalars().all():
                    self.db.lock(conn, f"rollout:{rid}")
                    conn.execute(update(t.rollouts).where(ro.rollout_id == rid).values(
                        state="stopped", stop_reason="release withdrawn", updated_ms=now_ms))
                audit(conn, operator_id, "release_withdraw", version, {}, now_ms)
        return _release_out(have)

    # ------------------------------------------------------------ rollouts

    def create_rollout(self, operator_id: str, version: str, machine_ids: list[str] | None, percent: int | None,
                       max_rollback_pct: int, now_ms: int) -> dict[str, Any]:
        if (machine_ids is None) == (percent is None):
            raise Invalid("targets", "give either machine_ids or percent")
        with self.db.tx() as conn:
            self.db.lock(conn, "rollouts")              # one open rollout per machine: checked, then written
            rel = first_row(conn, select(t.releases).where(r_.version == version))
            if rel is None:
                raise NotFound("no_release", f"no release {version}")
            if rel["withdrawn_ms"] is not None:
                raise Conflict("withdrawn", f"release {version} was withdrawn")
            known = set(conn.execute(select(t.machines.c.machine_id)).scalars().all())
            if machine_ids is not None:
                unknown = sorted(set(machine_ids) - known)
                if unknown:
                    raise NotFound("no_machine", f"no machine {unknown[0]}", machine_ids=unknown)
            rid = conn.execute(insert(t.rollouts).values(
                version=version, created_by=operator_id, created_ms=now_ms, state="active",
                machine_ids=sorted(set(machine_ids)) if machine_ids is not None else None, percent=percent,
                max_rollback_pct=max_rollback_pct, updated_ms=now_ms).returning(ro.rollout_id)).scalar_one()
            targets = sorted(set(machine_ids)) if machine_ids is not None else \
                sorted(m for m in known if selected(rid, m, percent or 0))
            if not targets:
                raise Invalid("no_machines", f"{percent} % of the {len(known)} machines selects none: choose a "
                                             "higher percent or the machines")
            busy = conn.execute(select(mu.machine_id, mu.rollout_id).join(t.rollouts, ro.rollout_id == mu.rollout_id)
                                .where(and_(ro.state.in_(OPEN), mu.machine_id.in_(targets)))).all()
            if busy:
                raise Conflict("machine_in_rollout", f"machine {busy[0][0]} is in rollout {busy[0][1]}, which is "
                                                     "not over: stop it first",
                               machines=sorted({m for m, _ in busy}))
            conn.execute(insert(t.machine_updates), [
                {"rollout_id": rid, "machine_id": m, "version": version, "step": "pending", "reason": "",
                 "detail": "", "running_version": "", "updated_ms": now_ms} for m in targets])
            conn.execute(insert(t.machine_update_steps), [
                {"rollout_id": rid, "machine_id": m, "version": version, "step": "pending", "reason": "",
                 "detail": "", "running_version": "", "source": "cloud", "applied": True, "repeats": 1,
                 "at_ms": now_ms, "last_at_ms": now_ms} for m in targets])
            audit(conn, operator_id, "rollout_create", str(rid),
                  {"version": version, "machines": len(targets), "percent": percent,
                   "max_rollback_pct": max_rollback_pct}, now_ms)
        return self.rollout(rid)

    def change_rollout(self, operator_id: str, rollout_id: int, action: str, now_ms: int) -> dict[str, Any]:
        """pause (no more offers; machines mid-way finish what they started), resume, stop (for good)."""
        allowed = {"pause": ("active",), "resume": ("paused",), "stop": OPEN}[action]
        new = {"pause": "paused", "resume": "active", "stop": "stopped"}[action]
        with self.db.tx() as conn:
            self.db.lock(conn, f"rollout:{rollout_id}")
            row = first_row(conn, select(t.rollouts).where(ro.rollout_id == rollout_id))
            if row is None:
                raise NotFound("no_rollout", f"no rollout {rollout_id}")
            if row["state"] not in allowed:
                raise Conflict("rollout_state", f"rollout {rollout_id} is {row['state']}: it cannot {action}",
                               state=row["state"])
            values: dict[str, Any] = {"state": new, "updated_ms": now_ms}
            if action == "stop":
                values["stop_reason"] = f"stopped by {operator_id}"
            conn.execute(update(t.rollouts).where(ro.rollout_id == rollout_id).values(**values))
            audit(conn, operator_id, f"rollout_{action}", str(rollout_id), {}, now_ms)
        return self.rollout(rollout_id)

    def rollouts(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = [dict(x) for x in conn.execute(select(t.rollouts).order_by(ro.rollout_id.desc())).mappings()]
            counts: dict[int, Counter] = {}
            for rid, step, n in conn.execute(select(mu.rollout_id, mu.step, func.count())
                                             .group_by(mu.rollout_id, mu.step)):
                counts.setdefault(rid, Counter())[step] = n
        return [_rollout_out(x, counts.get(x["rollout_id"], Counter())) for x in rows]

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """A rollout with each machine's step and the version its last heartbeat said it runs."""
        with self.db.read() as conn:
            row = first_row(conn, select(t.rollouts).where(ro.rollout_id == rollout_id))
            if row is None:
                raise NotFound("no_rollout", f"no rollout {rollout_id}")
            machines = [dict(x) for x in conn.execute(
                select(mu.machine_id, mu.step, mu.reason, mu.detail, mu.running_version, mu.updated_ms,
                       t.machines.c.heartbeat, t.machines.c.last_seen_ms)
                .join(t.machines, t.machines.c.machine_id == mu.machine_id, isouter=True)
                .where(mu.rollout_id == rollout_id).order_by(mu.machine_id)).mappings()]
        for m in machines:
            hb = m.pop("heartbeat") or {}
            m["heartbeat_version"] = hb.get("software_version", "")
        out = _rollout_out(row, Counter(m["step"] for m in machines))
        out["machines"] = machines
        return out

    # ------------------------------------------------------------ the machines' side

    def offer(self, machine_id: str, software_version: str, now_ms: int) -> p.UpdateOfferMsg | None:
        """What a heartbeat's answer offers the machine: the release of its open rollout while that is active,
        the machine runs another version and has not ended its update. A heartbeat already running the
        rollout's version marks the machine healthy (the new release reached the cloud)."""
        with self.db.read() as conn:
            row = first_row(conn, _OFFERED, {"machine_id": machine_id})
        if row is None or row["step"] in ENDED_STEPS:
            return None
        if software_version == row["version"]:
            self._record(row["rollout_id"], machine_id, "healthy", "heartbeat", "", software_version, now_ms,
                         source="heartbeat", only_from=STEPS[:-4])
            return None
        if row["state"] != "active":
            return None
        return p.UpdateOfferMsg(rollout_id=row["rollout_id"], version=row["version"], url=bundle_url(row["version"]),
                                sha256=row["sha256"], size_bytes=row["size_bytes"])

    def bundle_for(self, machine_id: str, version: str) -> tuple[Path, int]:
        """The bundle file a machine may download: only the version its rollout offers it, while the rollout is
        active, or paused once the machine has begun (a pause stops new offers; a machine whose download broke off
        resumes it, else its updater takes the refusal as final and reports ``failed``, which would count against
        the rollout as a rollback does and stop it)."""
        q = (select(r_.size_bytes).select_from(t.machine_updates)
             .join(t.rollouts, ro.rollout_id == mu.rollout_id).join(t.releases, r_.version == ro.version)
             .where(and_(mu.machine_id == machine_id, ro.version == version,
                         or_(ro.state == "active", and_(ro.state == "paused", mu.step != "pending")),
                         r_.withdrawn_ms.is_(None), mu.step.not_in(ENDED_STEPS))))
        with self.db.read() as conn:
            size = conn.execute(q).scalar()
        path = self.bundle_path(version)
        if size is None or not path.is_file():
            raise NotFound("not_offered", f"release {version} is not offered to machine {machine_id}")
        return path, size

    def report(self, machine_id: str, msg: p.UpdateReportMsg, now_ms: int) -> dict[str, Any]:
        """A machine's step. A report for a rollout the machine is not in is ignored (``recorded``: false); one for
        another version of it, or any step after healthy except rolled_back (a report the heartbeat overtook, or a
        late copy), leaves the current step as it is (``recorded``: false) and is kept in the history."""
        recorded = self._record(msg.rollout_id, machine_id, msg.step, msg.reason, msg.detail, msg.running_version,
                                now_ms, source="machine", version=msg.version)
        return {"recorded": recorded}

    def _record(self, rollout_id: int, machine_id: str, step: str, reason: str, detail: str, running_version: str,
                now_ms: int, *, source: str, version: str | None = None,
                only_from: tuple[str, ...] | None = None) -> bool:
        """Move the machine's current step (true), or not (false: see :meth:`report`); a machine's report goes into
        the history either way, the heartbeat's only when it moved the step (every heartbeat is no step)."""
        with self.db.tx() as conn:
            self.db.lock(conn, f"rollout:{rollout_id}")
            row = first_row(conn, select(t.machine_updates).where(and_(mu.rollout_id == rollout_id,
                                                                       mu.machine_id == machine_id)))
            if row is None:
                return False
            applied = ((version is None or version == row["version"])
                       and (only_from is None or row["step"] in only_from)
                       and (row["step"] != "healthy" or step == "rolled_back"))
            if not applied and source != "machine":
                return False
            detail, running_version = detail[:500], running_version[:40]
            _remember(conn, rollout_id, machine_id, version or row["version"], step, reason, detail, running_version,
                      source, applied, now_ms)
            if not applied:
                return False
            conn.execute(update(t.machine_updates).where(and_(mu.rollout_id == rollout_id,
                                                              mu.machine_id == machine_id)).values(
                step=step, reason=reason, detail=detail, running_version=running_version, updated_ms=now_ms))
            self._judge(conn, rollout_id, now_ms)
        return True

    def history(self, rollout_id: int, machine_id: str) -> dict[str, Any]:
        """One machine's steps in a rollout in the order they arrived, with its current step (404 for a rollout
        that does not exist or a machine it does not cover)."""
        with self.db.read() as conn:
            if first_row(conn, select(ro.rollout_id).where(ro.rollout_id == rollout_id)) is None:
                raise NotFound("no_rollout", f"no rollout {rollout_id}")
            cur = first_row(conn, select(mu.version, mu.step, mu.reason, mu.detail, mu.running_version, mu.updated_ms)
                            .where(and_(mu.rollout_id == rollout_id, mu.machine_id == machine_id)))
            if cur is None:
                raise NotFound("no_machine", f"machine {machine_id} is not in rollout {rollout_id}")
            rows = [dict(x) for x in conn.execute(
                select(hs.step_id, hs.version, hs.step, hs.reason, hs.detail, hs.running_version, hs.source,
                       hs.applied, hs.repeats, hs.at_ms, hs.last_at_ms)
                .where(and_(hs.rollout_id == rollout_id, hs.machine_id == machine_id))
                .order_by(hs.step_id)).mappings()]
        for x in rows:
            x["applied"] = bool(x["applied"])
        return {"rollout_id": rollout_id, "machine_id": machine_id, **cur, "max_rows": HISTORY_ROWS, "steps": rows}

    def prune_history(self, now_ms: int, keep_ms: int) -> int:
        """The steps of rollouts that ended (stopped or done) more than ``keep_ms`` ago; each machine's outcome
        (its current step in ``machine_updates``) stays. Returns how many rows went."""
        ended = select(ro.rollout_id).where(and_(ro.state.in_(("stopped", "done")), ro.updated_ms < now_ms - keep_ms))
        with self.db.tx() as conn:
            return conn.execute(delete(t.machine_update_steps).where(hs.rollout_id.in_(ended))).rowcount

    def _judge(self, conn: Connection, rollout_id: int, now_ms: int) -> None:
        """After a step changed, under the rollout's lock: stop it when rollbacks pass its limit
        among the machines that switched (alarm, audited), or call it done when every machine is healthy."""
        row = first_row(conn, select(t.rollouts).where(ro.rollout_id == rollout_id))
        if row is None or row["state"] not in OPEN:
            return
        counts = Counter(dict(conn.execute(select(mu.step, func.count()).where(mu.rollout_id == rollout_id)
                                           .group_by(mu.step)).all()))
        reached = sum(counts[s] for s in REACHED_SWITCH)
        bad = counts["rolled_back"]
        if reached >= 1 and bad * 100 > row["max_rollback_pct"] * reached:
            reason = (f"{bad} of {reached} machines that switched rolled back, more than "
                      f"{row['max_rollback_pct']} %")
            conn.execute(update(t.rollouts).where(ro.rollout_id == rollout_id).values(
                state="stopped", stop_reason=reason, updated_ms=now_ms))
            detail = {"rollout_id": rollout_id, "version": row["version"], "rolled_back": counts["rolled_back"],
                      "failed": counts["failed"], "switched": reached, "max_rollback_pct": row["max_rollback_pct"]}
            audit(conn, "system", "rollout_auto_stop", str(rollout_id), detail, now_ms)
            raise_alarm(conn, "rollout", "rollout_stopped", detail, now_ms)
            log.warning("rollout %d of %s stopped: %s", rollout_id, row["version"], reason)
        elif counts and counts["healthy"] == sum(counts.values()):
            conn.execute(update(t.rollouts).where(ro.rollout_id == rollout_id).values(state="done",
                                                                                      updated_ms=now_ms))
            log.info("rollout %d of %s done", rollout_id, row["version"])


def _remember(conn: Connection, rollout_id: int, machine_id: str, version: str, step: str, reason: str, detail: str,
              running_version: str, source: str, applied: bool, now_ms: int) -> None:
    """A step into the machine's history, under the rollout's lock: the same one as the newest row again (a
    machine reporting ``deferred`` while it stays busy) counts on that row; a new row beyond ``HISTORY_ROWS``
    drops the oldest."""
    where = and_(hs.rollout_id == rollout_id, hs.machine_id == machine_id)
    last = first_row(conn, select(hs.step_id, hs.version, hs.step, hs.reason, hs.source, hs.applied)
                     .where(where).order_by(hs.step_id.desc()).limit(1))
    if last is not None and (last["version"], last["step"], last["reason"], last["source"], bool(last["applied"])) \
            == (version, step, reason, source, applied):
        conn.execute(update(t.machine_update_steps).where(hs.step_id == last["step_id"]).values(
            repeats=hs.repeats + 1, last_at_ms=now_ms, detail=detail, running_version=running_version))
        return
    conn.execute(insert(t.machine_update_steps).values(
        rollout_id=rollout_id, machine_id=machine_id, version=version, step=step, reason=reason, detail=detail,
        running_version=running_version, source=source, applied=applied, repeats=1, at_ms=now_ms, last_at_ms=now_ms))
    old = conn.execute(select(hs.step_id).where(where).order_by(hs.step_id.desc()).offset(HISTORY_ROWS)).scalars().all()
    if old:
        conn.execute(delete(t.machine_update_steps).where(hs.step_id.in_(old)))


def _key_id(fh) -> str:
    import json
    import tarfile
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        return str(json.loads(tar.extractfile("manifest.sig").read())["key_id"])[:16]


def _summary(manifest: b.ReleaseManifest) -> dict[str, Any]:
    """The manifest as the console shows it: everything but the list of files, which is counted instead."""
    names = list(manifest.files)
    return {"version": manifest.version, "min_version": manifest.min_version, "device_types": manifest.device_types,
            "created_ms": manifest.created_ms, "file_count": len(names),
            "app_files": sum(n.startswith("app/") for n in names),
            "wheel_files": sum(n.startswith("wheels/") for n in names), "files_bytes": manifest.total_size()}


def _release_out(row: dict[str, Any]) -> dict[str, Any]:
    return {**{k: row[k] for k in ("version", "sha256", "size_bytes", "key_id", "manifest", "notes", "uploaded_by",
                                    "uploaded_ms", "withdrawn_ms")}}


def _rollout_out(row: dict[str, Any], counts: Counter) -> dict[str, Any]:
    return {**row, "counts": {s: counts.get(s, 0) for s in STEPS}, "machine_count": sum(counts.values())}
