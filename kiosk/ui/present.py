"""What each screen shows, as text, from the core's :class:`~kiosk.session.Snapshot`. Pure (no Kivy, no
clock reads: the caller passes the wall time it saw the session start), so it is tested directly."""

from __future__ import annotations

from kiosk.events import State
from kiosk.session import Snapshot
from kiosk.ui.i18n import STRINGS, lockout_text, reason_text, tr

SCREENS = {State.IDLE: "idle", State.DISPENSING: "dispensing", State.SETTLING: "dispensing",
           State.RECEIPT: "receipt", State.OFFLINE: "offline", State.OUT_OF_SERVICE: "out_of_service",
           State.MAINTENANCE: "maintenance", State.UPDATING: "updating"}


def screen_for(snap: Snapshot) -> str:
    return SCREENS[snap.state]


def yuan(fen: int) -> str:
    return f"{fen / 100:.2f}"


def litres(ml: int) -> str:
    return f"{ml / 1000:.3f}"


def duration(ms: int, lang: str) -> str:
    s = max(0, ms) // 1000
    m, s = divmod(s, 60)
    return f"{m} {tr('minutes', lang)} {s} {tr('seconds', lang)}" if m else f"{s} {tr('seconds', lang)}"


def tds_text(snap_tds: int | None, measured: bool, limit: int, lang: str) -> str:
    if not measured or snap_tds is None:
        return tr("unknown", lang)
    verdict = tr("tds_ok", lang) if snap_tds <= limit else tr("tds_high", lang)
    return f"{snap_tds} ppm {verdict}"


def rejection_text(code: str, lang: str) -> str:
    """A refused start's reason in words (never a raw code such as "busy")."""
    key = f"rej_{code}"
    return tr(key, lang) if key in STRINGS else tr("rej_other", lang)


def temp_text(temp_c: float | None, lang: str) -> str:
    return tr("unknown", lang) if temp_c is None else f"{temp_c:.1f} °C"


def present(snap: Snapshot, lang: str, *, started_hhmm: str = "", maintenance_timeout_ms: int = 600_000
            ) -> dict[str, str | float | bool]:
    """Every changing text on every screen, for this snapshot and language."""
    v: dict[str, str | float | bool] = {
        "machine": f"{tr('machine_no', lang)} {snap.machine_id}",
        "price": f"{yuan(snap.display_price_fen_per_l)} {tr('yuan_per_l', lang)}",
        "temp": temp_text(snap.temp_c, lang),
        "tds": tds_text(snap.tds_ppm, snap.tds_measured, snap.tds_limit_ppm, lang),
        "volume": litres(snap.volume_ml),
        "cost": yuan(snap.cost_fen),
        "remaining": f"¥{yuan(snap.remaining_credit_fen)}",
        "flow": f"{snap.flow_ml_per_min} {tr('ml_per_min', lang)}",
        "progress": min(1.0, snap.progress_permille / 1000),
        "settling": snap.state is State.SETTLING,
        "lockouts": "\n".join(dict.fromkeys(lockout_text(r, lang) for r in snap.lockouts)) or tr("lock_other", lang),
        "rejection": tr("rejected", lang, why=rejection_text(snap.last_rejection, lang)) if snap.last_rejection else "",
        "support": tr("support_hotline", lang, number=snap.hotline) if snap.hotline else tr("support", lang),
        "updating": tr("updating_body", lang) + (f"\n{tr('updating_to', lang, version=snap.updating_version)}"
                                                 if snap.updating_version else ""),
    }
    if snap.state is State.MAINTENANCE:
        v.update(maintenance_texts(snap, lang, maintenance_timeout_ms))
    r = snap.receipt
    if r is not None:
        v.update({
            "r_time": started_hhmm,
            "r_duration": duration(r.duration_ms, lang),
            "r_volume": f"{litres(r.volume_ml)} {tr('litre', lang)}",
            "r_avg_flow": f"{r.avg_flow_ml_per_min} {tr('ml_per_min', lang)}",
            "r_amount": f"¥{yuan(r.cost_fen)}",
            "r_price": f"{yuan(r.price_fen_per_l)} {tr('yuan_per_l', lang)}",
            "r_temp": temp_text(r.temp_start_c, lang),
            "r_tds": tds_text(r.tds_ppm, r.tds_measured, r.tds_limit_ppm, lang),
            "r_points": f"+{r.points}",
            "r_reason": reason_text(r.reason, lang),
            "r_balance": "—" if snap.receipt_balance_fen is None else f"¥{yuan(snap.receipt_balance_fen)}",
        })
    return v


def tech_flow_ml_per_min(snap: Snapshot) -> int:
    if not snap.tech_active or not snap.tech_elapsed_ms:
        return 0
    return snap.tech_volume_ml * 60_000 // snap.tech_elapsed_ms


def maintenance_texts(snap: Snapshot, lang: str, timeout_ms: int) -> dict[str, str | bool]:
    v: dict[str, str | bool] = {
        "m_factor": f"{snap.milli_pulses_per_litre / 1000:.1f}",
        "m_pouring": snap.tech_active,
        "m_pour": tr("pouring", lang, ml=snap.tech_volume_ml, s=snap.tech_elapsed_ms // 1000) if snap.tech_active
        else "",
        "m_valve": tr("open", lang) if snap.tech_active else tr("closed", lang),
        "m_flow": f"{tech_flow_ml_per_min(snap)} {tr('ml_per_min', lang)}",
        "m_auto_exit": tr("auto_exit", lang, s=max(0, (timeout_ms - snap.maintenance_idle_ms) // 1000)),
        "m_last": "",
    }
    t = snap.tech_last
    if t is not None:
        why = tr(f"pour_end_{t.reason}", lang) if f"pour_end_{t.reason}" in STRINGS else t.reason
        v["m_last"] = tr("last_pour", lang, ml=t.volume_ml, p=t.pulses, s=f"{t.duration_ms / 1000:.1f}", why=why)
    return v


def event_line(kind: str, detail: dict, lang: str) -> str:
    """One line of the maintenance event log in words: what happened and the facts a technician acts on
    (volumes, money, reasons, who), never a raw JSON record."""
    key = f"ev_{kind}"
    words = [tr(key, lang) if key in STRINGS else kind.replace("_", " ")]
    d = detail or {}
    if kind == "price_changed" and isinstance(d.get("from"), int) and isinstance(d.get("to"), int):
        words.append(tr("ev_from_to", lang, a=yuan(d["from"]), b=yuan(d["to"])))
    if kind == "calibration_changed" and isinstance(d.get("from"), int) and isinstance(d.get("to"), int):
        words.append(tr("ev_factor", lang, a=f"{d['from'] / 1000:.1f}", b=f"{d['to'] / 1000:.1f}"))
    if isinstance(d.get("reason"), str):
        r = d["reason"]
        words.append(lockout_text(r, lang) if kind.startswith("lockout") or kind == "alarm_cleared" else
                     rejection_text(r, lang) if kind in ("grant_rejected", "session_start_failed") else
                     tr(f"pour_end_{r}", lang) if f"pour_end_{r}" in STRINGS else reason_text(r, lang)
                     if f"reason_{r}" in STRINGS else r)
    if isinstance(d.get("volume_ml"), int):
        words.append(f"{d['volume_ml']} {tr('ml', lang)}")
    if isinstance(d.get("cost_fen"), int):
        words.append(f"¥{yuan(d['cost_fen'])}")
    if isinstance(d.get("session_id"), str):
        words.append(d["session_id"][-8:])
    if d.get("actor"):
        words.append(tr("ev_by", lang, who=d["actor"]))
    if isinstance(d.get("version"), str):
        words.append(d["version"])
    return " · ".join(str(w) for w in words)
