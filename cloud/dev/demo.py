"""A demo fleet for the operators' console (``python -m cloud demo-data``; ``./run.sh`` seeds it into a fresh desktop
data folder). Development only: the caller refuses production mode, and :func:`seed_demo` refuses a database that
has it already.

What it makes, as the real system would have left it: 31 machines at 5 sites in Hangzhou and Shanghai (and one in
the workshop with no site), provisioned and enrolled through the devices service, with 7 days of heartbeat samples
(temperature and TDS every 5 minutes) and an event log (boots, a leak, ghost flow, a dead-lettered report); 50
people, most registered with their identity approved by a reviewer, some waiting for review, two rejected;
top-ups paid through the sandbox; a week of sessions, each settled the way :meth:`cloud.sessions.service.Sessions
._settle` settles a report (the start command and its claim, hold, release and charge, points, bill, rental record
and the stored report, with the contract's fee rule); a few voided starts; refunds, gifts, redemptions with pickup
codes and handovers, a price change, all through the services, so they are audited like an operator's own.

The bulk rows go in with one multi-row insert per table (a few seconds on SQLite); the random choices are seeded,
so two runs at the same moment make the same fleet.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update

import contract as p
from cloud import db as t
from cloud.accounts.identity import check_digit
from cloud.accounts.providers import ManualReview
from cloud.accounts.service import CONSENT_VERSION, Accounts
from cloud.db import audit
from cloud.deps import Services
from cloud.errors import DomainError
from cloud.sessions.service import VOID_AFTER_MS

DAY_MS = 86_400_000
MIN_MS = 60_000
DAYS = 7
ADMIN = "demo-admin"
ADMIN_FILE = "console-demo-admin.txt"       # in the data folder: the development admin's password, for the terminal
MARK = "demo_data"                          # the audit action that says the demo fleet is here
MPPL = 450_000                              # milli-pulses per litre of the demo machines' meters

# site, address prefix, machine id prefix, sessions per machine per day, price fen/L
SITES = [
    ("杭州西湖文化广场", "浙江省杭州市拱墅区中山北路西湖文化广场", "HZ-XH", 26, 200),
    ("杭州滨江网商路园区", "浙江省杭州市滨江区网商路699号阿里巴巴滨江园区", "HZ-BJ", 32, 180),
    ("杭州未来科技城", "浙江省杭州市余杭区文一西路1818号未来科技城海创园", "HZ-WK", 18, 150),
    ("上海张江科学城", "上海市浦东新区张江高科技园区碧波路690号", "SH-ZJ", 22, 250),
    ("上海人民广场", "上海市黄浦区人民大道120号人民广场地铁站", "SH-RM", 40, 280),
]
SPOTS = ["一号楼一层大堂东侧饮水点", "二号楼三层茶水间入口右侧", "B1层地下通道中段立柱旁", "南门保安亭北侧十米",
         "三号楼五层电梯厅对面", "地铁2号口出站闸机外侧"]
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高欧阳"
GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超",
         "秀兰", "霞", "平", "刚", "桂英", "建华", "子涵", "浩然", "一诺", "梓萱"]
HOURS = [0.2, 0.1, 0.05, 0.05, 0.1, 0.4, 1.2, 2.6, 3.4, 2.2, 1.8, 2.4, 3.2, 2.6, 1.9, 1.8, 2.0, 2.6, 3.0, 2.2,
         1.6, 1.2, 0.8, 0.4]                # how busy each hour of the day is (China time)
GIFTS = [("定制款不锈钢真空保温杯（五百毫升）", "Stainless-steel vacuum flask (500 ml)", 120, 20),
         ("环保帆布购物袋", "Canvas shopping bag", 40, 60), ("便携折叠水杯", "Folding travel cup", 60, 3),
         ("滤芯更换优惠券（八折）", "Filter voucher (20 % off)", 30, 200),
         ("儿童卡通水壶", "Children's water bottle", 80, 0)]


class DemoRefused(RuntimeError):
    pass


def seed_demo(svc: Services, data_dir: Path, now_ms: int, seed: int = 2026) -> dict[str, int]:
    """Seed the demo fleet into ``svc``'s database; returns how many of each were made. Refuses a second time."""
    with svc.database.read() as conn:
        done = conn.execute(select(t.audit_log.c.at_ms).where(t.audit_log.c.action == MARK)).scalar()
    if done is not None:
        when = datetime.fromtimestamp(done / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
        raise DemoRefused(f"this database has the demo fleet already (seeded {when}); nothing was changed")
    return _Demo(svc, data_dir, now_ms, random.Random(seed)).run()


def demo_admin(svc: Services, data_dir: Path, now_ms: int) -> tuple[str, str]:
    """The development admin who signs in to the console, and its password: kept in the data folder (mode 0600) so
    each start can print it; made, or given a new password, when either is missing."""
    path = data_dir / ADMIN_FILE
    with svc.database.read() as conn:
        known = conn.execute(select(t.operators.c.operator_id).where(t.operators.c.operator_id == ADMIN)).scalar()
    if known and path.exists():
        return ADMIN, path.read_text().strip()
    password = f"demo-{secrets.token_urlsafe(9)}"
    if known:
        svc.console.set_password(ADMIN, password, now_ms, actor="demo-data")
    else:
        svc.console.create("demo-data", ADMIN, "演示管理员", "admin", password, now_ms)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return ADMIN, password


class _Demo:
    def __init__(self, svc: Services, data_dir: Path, now_ms: int, rng: random.Random) -> None:
        self.svc, self.data_dir, self.now, self.rng = svc, data_dir, now_ms, rng
        self.start = now_ms - DAYS * DAY_MS
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.balance: dict[str, int] = {}
        self.points: dict[str, int] = {}
        self.changes: dict[str, dict[str, Any]] = {}

    def add(self, table: str, **row: Any) -> None:
        self.rows.setdefault(table, []).append(row)

    def run(self) -> dict[str, int]:
        demo_admin(self.svc, self.data_dir, self.start - 30 * DAY_MS)
        for name, display, role in (("li.shenhe", "李审核", "reviewer"), ("zhang.yunying", "张运营", "operator"),
                                    ("chen.kan", "陈查看", "viewer")):
            self.svc.console.create(ADMIN, name, display, role, secrets.token_urlsafe(18), self.start - 29 * DAY_MS)
        machines = self.machines_made = self.machines()
        users = self.people()
        self.sessions(machines, users)
        self.events(machines)
        with self.svc.database.tx() as conn:
            for table, rows in self.rows.items():
                conn.execute(insert(t.metadata.tables[table]), rows)
            for user_id, points in self.points.items():
                conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(points=points))
        self.after()
        counts = {table: len(rows) for table, rows in self.rows.items()}
        with self.svc.database.tx() as conn:
            audit(conn, ADMIN, MARK, "demo", counts, self.now)
        return counts

    # ---------------------------------------------------------------- machines and what their heartbeats said
    def machines(self) -> list[dict[str, Any]]:
        out = []
        made = self.start - 28 * DAY_MS
        for site, address, prefix, per_day, price in SITES:
            for n, spot in enumerate(SPOTS, 1):
                out.append({"machine_id": f"{prefix}-{n:02d}", "site": site, "location": address + spot,
                            "per_day": per_day * self.rng.uniform(0.6, 1.3),
                            "price": min(300, max(150, price + self.rng.choice((-20, 0, 0, 0, 20))))})
        out.append({"machine_id": "WS-TEST-01", "site": "", "location": "杭州市拱墅区莫干山路运维中心二楼测试台",
                    "per_day": 1.5, "price": 200})
        for i, m in enumerate(out):
            m.update(tds=self.rng.randint(35, 90), temp=self.rng.uniform(9.5, 12.5), boot=self.rng.randint(1, 6),
                     seq=0, version="0.2.0" if i % 7 else "0.1.9", offline=i in (5, 17),
                     filter=(self.rng.randint(150, 1_850), self.rng.randint(5, 84)))
            token = self.svc.machines.provision(ADMIN, m["machine_id"], m["location"], m["price"], p.Limits(), made)
            self.svc.machines.enroll(m["machine_id"], token, made + 3_600_000)
        out[23].update(tds=420, filter=(1_930, 86))     # a filter at its end: TDS climbing over the week
        return out

    def heartbeat(self, m: dict[str, Any], lockouts: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
        filter_l, filter_days = m["filter"]
        consumables = [
            p.ConsumableMsg(kind="filter", used_l=filter_l, life_l=2_000, used_days=filter_days, life_days=90,
                            used_permille=max(filter_l // 2, filter_days * 1000 // 90),
                            due=max(filter_l // 2, filter_days * 1000 // 90) >= 900),
            p.ConsumableMsg(kind="uv_lamp", used_l=0, life_l=0, used_days=filter_days + 40, life_days=365,
                            used_permille=(filter_days + 40) * 1000 // 365, due=False)]
        return p.HeartbeatMsg(**{**dict(
            state="out_of_service" if lockouts else "idle", valve_open=False, temp_c=round(m["temp"], 1),
            tds_ppm=m["tds"], outbox_depth=3 if m["offline"] else 0, totalizer_pulses=m["seq"] * 400_000,
            lockouts=list(lockouts), software_version=m["version"], boot_id=m["boot"],
            dead_letters=1 if m["machine_id"] == "SH-ZJ-02" else 0, uptime_s=3 * 86_400, consumables=consumables,
            price_fen_per_l=m["price"]), **changes}).model_dump()

    def samples(self, m: dict[str, Any], until_ms: int) -> None:
        phase = self.rng.uniform(0, 2 * math.pi)
        for at in range(self.start, until_ms, 5 * MIN_MS):
            day_part = math.sin(2 * math.pi * ((at + 8 * 3_600_000) % DAY_MS) / DAY_MS + phase)
            climb = (at - until_ms) / (DAYS * DAY_MS) * (m["tds"] - 60 if m["tds"] > 120 else 6)   # to its last
            self.add("machine_samples", machine_id=m["machine_id"], at_ms=at,
                     temp_c=round(m["temp"] + 1.4 * day_part + self.rng.gauss(0, 0.15), 1),
                     tds_ppm=max(5, int(m["tds"] + climb) + self.rng.randint(-3, 3)), outbox_depth=0, dead_letters=0)

    # ---------------------------------------------------------------- people, their identities and top-ups
    def people(self) -> list[str]:
        accounts = Accounts(self.svc.database, self.svc.machines.box, self.svc.accounts.sms, ManualReview(),
                            self.svc.accounts.settings)          # registrations wait for a reviewer, as in production
        photo = _card_photo()
        verified = []
        for i in range(50):
            user_id = "u-" + uuid.uuid5(uuid.NAMESPACE_URL, f"tapshare-demo-{i}").hex[:16]
            joined = self.start - self.rng.randint(1, 40) * DAY_MS
            with self.svc.database.tx() as conn:
                conn.execute(insert(t.users).values(user_id=user_id, phone=f"1{self.rng.choice('3578')}"
                                                    f"{self.rng.randint(0, 999_999_999):09d}", created_ms=joined))
            if i >= 48:
                continue                       # logged in once, never registered
            name = self.rng.choice(SURNAMES) + "".join(self.rng.choice(GIVEN) for _ in range(self.rng.randint(1, 2)))
            first17 = f"3301{self.rng.randint(2, 9)}{self.rng.randint(1, 9)}{self.rng.randint(1970, 2004)}" \
                      f"{self.rng.randint(1, 12):02d}{self.rng.randint(1, 28):02d}{i:03d}"
            accounts.consent(user_id, CONSENT_VERSION, joined + 60_000)
            photo_id = accounts.upload_photo(user_id, photo, "image/jpeg", joined + 120_000)["photo_id"]
            accounts.register(user_id, name, "resident_id", first17 + check_digit(first17), photo_id, joined + 180_000)
            if i < 40:
                accounts.decide("li.shenhe", user_id, True, "", joined + 3 * 3_600_000)
                verified.append(user_id)
            elif i < 42:
                accounts.decide("li.shenhe", user_id, False, "证件照片模糊，请在光线充足处重新拍摄证件正面",
                                joined + 5 * 3_600_000)
        return verified

    def top_up(self, user_id: str, at_ms: int) -> None:
        amount = self.rng.choice((2_000, 5_000, 5_000, 10_000))
        order_id = "T" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:23]
        self.add("topup_orders", order_id=order_id, user_id=user_id, amount_fen=amount, state="paid",
                 provider="sandbox", provider_txn_id="sbx" + order_id[1:17], created_ms=at_ms - 40_000,
                 expires_ms=at_ms + 15 * MIN_MS, paid_ms=at_ms, notifications=1, channel="h5", refunded_fen=0)
        self.entry(user_id, "topup", amount, at_ms, note=f"order {order_id}")

    def entry(self, user_id: str, kind: str, amount_fen: int, at_ms: int, session_id: str | None = None,
              note: str = "") -> None:
        self.balance[user_id] = self.balance.get(user_id, 0) + amount_fen
        self.add("balance_entries", user_id=user_id, kind=kind, amount_fen=amount_fen, session_id=session_id,
                 note=note, created_ms=at_ms)

    # ---------------------------------------------------------------- a week of sessions, settled
    def sessions(self, machines: list[dict[str, Any]], users: list[str]) -> None:
        starts = []
        for m in machines:
            for d in range(DAYS + 1):
                day0 = self.start - (self.start + 8 * 3_600_000) % DAY_MS + d * DAY_MS   # midnight, China time
                weekend = datetime.fromtimestamp(day0 / 1000 + 8 * 3600, UTC).weekday() >= 5
                n = int(m["per_day"] * (0.7 if weekend and m["site"] else 1.0) * self.rng.uniform(0.8, 1.2))
                for hour in self.rng.choices(range(24), weights=HOURS, k=n):
                    at = day0 + hour * 3_600_000 + self.rng.randint(0, 3_599_000)
                    if self.start <= at < self.now - 10 * MIN_MS:
                        starts.append((at, m))
        busy: dict[str, int] = {}
        for at, m in sorted(starts, key=lambda x: x[0]):
            if busy.get(m["machine_id"], 0) > at:
                continue                                           # one session at a time per machine
            user = self.rng.choice([u for u in self.rng.sample(users, 5) if busy.get(u, 0) <= at] or users)
            if self.balance.get(user, 0) < 1_000:
                self.top_up(user, at - self.rng.randint(2, 30) * MIN_MS)
            end = self.session(m, user, at)
            busy[m["machine_id"]] = busy[user] = end + MIN_MS
        for m in machines:
            m["last_seen"] = self.now - (self.rng.randint(4, 9) * 3_600_000 if m["offline"] else
                                         self.rng.randint(2, 25) * 1000)
            self.samples(m, m["last_seen"])

    def session(self, m: dict[str, Any], user: str, at: int) -> int:
        """One session started at ``at``: claimed, poured and settled (or, once in a while, never claimed)."""
        sid = "s-" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:20]
        cid = "c-" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:20]
        available = self.balance.get(user, 0)
        credit = min(available, p.LIMIT_BOUNDS["max_credit_fen"].default)
        deadline = at + p.GRANT_DEADLINE_MS
        grant = p.GrantMsg(session_id=sid, machine_id=m["machine_id"], user_ref=user, price_fen_per_l=m["price"],
                           credit_limit_fen=credit, max_volume_ml=p.Limits().max_volume_ml,
                           max_duration_ms=p.Limits().max_duration_ms, max_idle_ms=p.Limits().max_idle_ms,
                           deadline_ms=deadline, min_dispense_ml=p.Limits().min_dispense_ml, balance_fen=available)
        body = p.CommandMsg(command_id=cid, kind="start", grant=grant, session_id=sid).model_dump(mode="json")
        session = dict(session_id=sid, machine_id=m["machine_id"], user_id=user, price_fen_per_l=m["price"],
                       credit_limit_fen=credit, command_id=cid, presence_hash=hashlib.sha256(sid.encode()).hexdigest(),
                       created_ms=at, deadline_ms=deadline, min_dispense_ml=p.Limits().min_dispense_ml,
                       max_volume_ml=p.Limits().max_volume_ml, progress=None)
        self.entry(user, "hold", -credit, at, sid, "held while the machine pours")
        if self.rng.random() < 0.012:                      # the machine never claimed it: voided, nothing charged
            ended = at + VOID_AFTER_MS
            self.add("commands", command_id=cid, machine_id=m["machine_id"], kind="start", body=body, created_ms=at,
                     expires_ms=ended, delivered_ms=None, acked_ms=None, ack_ok=None, ack_reason=None)
            self.add("sessions", **session, state="voided", acked_ms=None, ended_ms=ended, end_reason=None,
                     void_reason="the machine did not confirm in time", fee_fen=None, volume_ml=None)
            self.entry(user, "release", credit, ended, sid, "not charged")
            return ended
        acked = at + self.rng.randint(150, 600)
        self.add("commands", command_id=cid, machine_id=m["machine_id"], kind="start", body=body, created_ms=at,
                 expires_ms=deadline, delivered_ms=at + 40, acked_ms=acked, ack_ok=True, ack_reason="")
        flow_ml_per_min = self.rng.randint(3_500, 7_500)
        want_ml = self.rng.choice((self.rng.randint(250, 600), self.rng.randint(500, 1_600))) \
            if self.rng.random() > 0.01 else 5                       # a few change their mind: below the minimum
        pulses = min(want_ml * MPPL // 1_000_000, credit * MPPL // (m["price"] * 1000))
        reason = "stop_button" if pulses < credit * MPPL // (m["price"] * 1000) else "credit_exhausted"
        volume = p.volume_ml(pulses, MPPL)
        free = volume < p.Limits().min_dispense_ml
        fee = 0 if free else p.fee_fen(pulses, MPPL, m["price"])
        duration = max(1_500, volume * 60_000 // flow_ml_per_min + self.rng.randint(500, 2_500))
        opened = acked + 300
        closed, settled = opened + duration, opened + duration + self.rng.randint(800, 2_000)
        m["seq"] += 1
        temp = round(m["temp"] + self.rng.gauss(0, 0.3), 1)
        step = 1_000
        series = [[ms, pulses * ms // duration, 0, temp, True] for ms in range(0, duration, step)]
        series.append([duration, pulses, 1, round(temp + 0.2, 1), False])
        record = p.SessionEndedPayload(
            event_id=f"{m['boot']}-{m['seq']}", kind="session_ended", machine_id=m["machine_id"], boot_id=m["boot"],
            created_at=_iso(settled - 200), session_id=sid, user_ref=user, reason=reason, started_at=_iso(opened),
            closed_at=_iso(closed), ended_at=_iso(settled - 200), duration_ms=duration, price_fen_per_l=m["price"],
            credit_limit_fen=credit, min_dispense_ml=p.Limits().min_dispense_ml, milli_pulses_per_litre=MPPL,
            billed_pulses=pulses, overrun_pulses=1, volume_ml=volume, cost_fen=fee, below_minimum=free,
            avg_flow_ml_per_min=volume * 60_000 // duration, temp_start_c=temp, temp_end_c=round(temp + 0.2, 1),
            water_quality={"tds_ppm": m["tds"], "tds_measured": True, "tds_limit_ppm": 500},
            flow_series=series, valve_events=[[0, "open"], [duration, "close", reason]]).model_dump(mode="json")
        digest = hashlib.sha256(json.dumps({"kind": "session_ended", "payload": record}, sort_keys=True,
                                           separators=(",", ":")).encode()).hexdigest()
        self.add("reports", machine_id=m["machine_id"], event_id=record["event_id"], kind="session_ended",
                 body_sha256=digest, status="accepted", detail="", payload=record, received_ms=settled,
                 occurred_ms=settled - 200)
        self.add("sessions", **session, state="ended", acked_ms=acked, ended_ms=settled, end_reason=reason,
                 void_reason=None, fee_fen=fee, volume_ml=volume)
        self.entry(user, "release", credit, settled, sid)
        if fee:
            self.entry(user, "charge", -fee, settled, sid, f"{volume} ml at {m['price']} fen/l")
        points = p.points_for_fee(fee)
        if points:
            self.points[user] = self.points.get(user, 0) + points
            self.add("points_entries", user_id=user, delta=points, kind="earn", ref=sid, note="water bought",
                     created_ms=settled)
        wq = {**record["water_quality"], "temp_start_c": temp, "temp_end_c": round(temp + 0.2, 1)}
        self.add("bills", session_id=sid, user_id=user, machine_id=m["machine_id"], started_at=record["started_at"],
                 ended_at=record["closed_at"], duration_ms=duration, volume_ml=volume,
                 avg_flow_ml_per_min=volume * 60_000 // duration, amount_fen=fee, price_fen_per_l=m["price"],
                 water_quality=wq, points=points, end_reason=reason, created_ms=settled)
        self.add("rental_records", session_id=sid, machine_id=m["machine_id"], user_id=user,
                 started_at=record["started_at"], ended_at=record["closed_at"], started_ms=at, record=record)
        return settled

    # ---------------------------------------------------------------- the event log, lockouts and alarms
    def events(self, machines: list[dict[str, Any]]) -> None:
        by_id = {m["machine_id"]: m for m in machines}
        for m in machines:
            self.event(m, p.EventKind.BOOT, self.start + self.rng.randint(1, 20) * 3_600_000,
                       {"version": m["version"], "boot_id": m["boot"], "totalizer_pulses": 0})
        leak, ghost = by_id["HZ-BJ-03"], by_id["SH-RM-05"]
        leak_at, ghost_at = self.now - 7 * 3_600_000, self.now - 26 * 3_600_000
        self.event(leak, p.EventKind.LOCKOUT, leak_at,
                   {"reason": "leak_sensor", "detail": "漏水传感器检测到积水：已关阀停止售水"})
        self.event(ghost, p.EventKind.GHOST_FLOW, ghost_at, {"pulses": 96, "volume_ml": 213})
        self.event(ghost, p.EventKind.LOCKOUT, ghost_at + 1_000,
                   {"reason": "ghost_flow", "detail": "阀门关闭时仍检测到水流 213 ml：已停止售水"})
        dead = by_id["SH-ZJ-02"]
        self.event(dead, p.EventKind.REPORT_DEAD_LETTERED, self.now - 30 * 3_600_000,
                   {"event_id": f"{dead['boot']}-7", "kind": "tech_pour",
                    "error": "rejected by the cloud: malformed tech_pour report"})
        self.event(by_id["HZ-XH-02"], p.EventKind.CONSUMABLE_REPLACED, self.now - 3 * DAY_MS,
                   {"kind": "filter", "actor": "tech-wang"})
        self.locked = {leak["machine_id"]: ("leak_sensor",), ghost["machine_id"]: ("ghost_flow",)}
        for m in machines:
            self.changes[m["machine_id"]] = {"site": m["site"], "hotline": "400-820-5678",
                                             "last_seen_ms": m["last_seen"], "heartbeat": self.heartbeat(m)}

    def event(self, m: dict[str, Any], kind: p.EventKind, at: int, detail: dict[str, Any]) -> None:
        m["seq"] += 1
        event_id = f"{m['boot']}-{m['seq']}"
        payload = {"event_id": event_id, "kind": kind.value, "machine_id": m["machine_id"], "boot_id": m["boot"],
                   "created_at": _iso(at), "detail": kind.detail_of(**detail)}
        self.add("machine_events", machine_id=m["machine_id"], event_id=event_id, kind=kind.value, payload=payload,
                 received_ms=at + 400, occurred_ms=at, alarm=kind.alarm)

    # ---------------------------------------------------------------- through the services: audited
    def after(self) -> None:
        ended = [s for s in self.rows["sessions"] if s["state"] == "ended" and s["fee_fen"]]
        for s, why in zip(self.rng.sample(ended, 4), ("出水量不足，顾客投诉", "机器故障中途停水", "重复扣费核实后退款",
                                                      "水温异常，顾客要求退款"), strict=True):
            amount = s["fee_fen"] if "重复" in why else max(1, s["fee_fen"] // 2)
            self.svc.wallet.refund("zhang.yunying", s["session_id"], amount, why, s["ended_ms"] + 2 * 3_600_000)
        gifts = [self.svc.rewards.add_gift("zhang.yunying", zh, en, cost, stock, self.start - DAY_MS)["gift_id"]
                 for zh, en, cost, stock in GIFTS]
        rich = sorted(self.points, key=self.points.get, reverse=True)[:9]
        for n, user in enumerate(rich):
            try:
                r = self.svc.rewards.redeem(user, gifts[n % 4], f"demo-{n}", self.now - (n + 1) * 9 * 3_600_000)
            except DomainError:
                continue                         # not enough points or out of stock: as in life
            if n % 3 == 0:
                self.svc.rewards.picked_up("zhang.yunying", r["redemption_id"], self.now - n * 5 * 3_600_000)
        rm01 = next(m for m in self.machines_made if m["machine_id"] == "SH-RM-01")    # its screen: the old price
        self.svc.operators.change_machine("zhang.yunying", "SH-RM-01", {"price_fen_per_l": rm01["price"] - 20},
                                          self.now - 40 * MIN_MS)
        self.alarms()

    def alarms(self) -> None:
        """The alarms as the rules open them from the heartbeats: a machine too warm 4 days ago (resolved when it
        cooled), then what the heartbeats say now (a leak, ghost flow, TDS, a dead-lettered report, two machines
        silent, filters due); operators acknowledge two."""
        hot, at = next(m for m in self.machines_made if m["machine_id"] == "HZ-WK-04"), self.now - 4 * DAY_MS
        for hb, seen in ((self.heartbeat(hot, temp_c=31.5), at), (self.heartbeat(hot), at + 2 * 3_600_000)):
            with self.svc.database.tx() as conn:
                conn.execute(update(t.machines).where(t.machines.c.machine_id == hot["machine_id"])
                             .values(heartbeat=hb, last_seen_ms=seen))
            self.svc.alarms.check(seen + MIN_MS)
        with self.svc.database.tx() as conn:
            for machine_id, values in self.changes.items():
                if machine_id in self.locked:
                    m = next(x for x in self.machines_made if x["machine_id"] == machine_id)
                    values = {**values, "heartbeat": self.heartbeat(m, self.locked[machine_id])}
                conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id).values(**values))
        self.svc.alarms.check(self.now)
        for rule, note in (("ghost_flow", "已通知现场维修人员，预计两小时内到场"), ("tds", "滤芯已订购，明天上午更换")):
            case = self.svc.alarms.cases("open", None, rule, 1, None)["alarms"][0]
            self.svc.alarms.acknowledge("zhang.yunying", case["alarm_id"], note, self.now - 10 * MIN_MS)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _card_photo() -> bytes:
    """A made-up identity card photo (the review page shows it)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (900, 570), (222, 234, 246))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((30, 30, 870, 540), 24, outline=(40, 70, 130), width=6)
    draw.rectangle((620, 110, 820, 360), fill=(190, 200, 215))
    for y in range(110, 420, 60):
        draw.rectangle((80, y, 80 + 420 - y // 3, y + 22), fill=(120, 130, 150))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()
