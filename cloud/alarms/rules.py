"""The rules that open operator alarms, declared once: each rule's severity and its words in Chinese and English.
The machine's offline rule and those its heartbeat judges (:data:`HEARTBEAT_RULES`) are resolved by the system when
their condition ends; the others by an operator. :func:`heartbeat_conditions` judges a machine's latest heartbeat
against the cloud's thresholds, with no I/O.

What the dispenser sends decides what clears what. Its heartbeat carries its lockouts and is sent at once when
one is set or lifted (:mod:`sync.link`), so a lockout's alarm follows the heartbeat: a wet leak sensor stays
locked out until a technician clears it on site, a fault until it is cleared, a condition alarm (temperature,
TDS, low water) until the machine lifts it. The ``lockout`` and ``alarm_cleared`` events say the same later,
through the outbox (behind any backlog), so they only add their words to an open alarm. Ghost-flow drips below
the lockout's threshold appear only as ``ghost_flow`` events: those open the alarm, which clears after a quiet
spell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEVERITIES = {"info": 0, "warning": 1, "critical": 2}
GHOST_QUIET_MS = 15 * 60_000    # no ghost flow seen this long (a drip is logged every minute while it lasts): over
GHOST_MIN_ML = 10               # a ghost-flow event below this is a meter's noise, not an alarm


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    zh: str
    en: str
    quiet_ms: int = 0            # resolved by the system only this long after the condition was last seen


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("offline", "critical", "机器离线", "machine offline"),
    Rule("leak", "critical", "漏水", "leak"),
    Rule("ghost_flow", "critical", "阀门关闭时有水流", "water flowing with the valve closed", quiet_ms=GHOST_QUIET_MS),
    Rule("storage", "critical", "存储故障", "storage fault"),
    Rule("hardware", "critical", "硬件故障", "hardware fault"),
    Rule("dead_letter", "warning", "上报被云端拒收", "reports refused by the cloud"),
    Rule("temperature", "warning", "水温超出范围", "water temperature out of range"),
    Rule("tds", "warning", "TDS 过高", "TDS too high"),
    Rule("low_water", "warning", "水箱水位低", "tank nearly empty"),
    Rule("filter_due", "info", "滤芯需更换", "filter due for replacement"),
    Rule("uv_lamp_due", "info", "紫外灯需更换", "UV lamp due for replacement"),
    # problems to look into, not states: only an operator resolves these
    Rule("session_lost", "warning", "会话丢失", "session lost"),
    Rule("implausible_report", "warning", "会话报告不合理", "implausible session report"),
    Rule("payments", "critical", "支付异常", "payments problem"),
    Rule("reconciliation", "critical", "对账不符", "reconciliation mismatch"),
    Rule("sms", "warning", "短信发送失败", "SMS not sent"),
    Rule("rollout", "critical", "软件升级已自动停止", "software rollout stopped by itself"),
)}
SEVERITY_WORDS = {"critical": ("严重", "CRITICAL"), "warning": ("警告", "WARNING"), "info": ("提示", "INFO")}

# the machine's lockout reasons (kiosk.events) and the rule each belongs to; any other "fault:<kind>" is hardware
LOCKOUT_RULES = {"leak_sensor": "leak", "ghost_flow": "ghost_flow", "fault:storage": "storage",
                 "temperature": "temperature", "tds": "tds", "low_water": "low_water"}
HEARTBEAT_RULES = ("leak", "ghost_flow", "storage", "hardware", "dead_letter", "temperature", "tds", "low_water",
                   "filter_due", "uv_lamp_due")


def lockout_rule(reason: str) -> str | None:
    """The rule a lockout reason belongs to (``operator``, a person's own doing, belongs to none)."""
    return LOCKOUT_RULES.get(reason) or ("hardware" if reason.startswith("fault:") else None)


@dataclass(frozen=True)
class Thresholds:
    """The cloud's own limits on the readings (the machine has its own, and locks itself out past them)."""

    temp_min_c: float
    temp_max_c: float
    tds_max_ppm: int


def heartbeat_conditions(hb: dict[str, Any], th: Thresholds) -> dict[str, dict[str, Any] | None]:
    """For each rule the heartbeat can judge: the condition's detail while it holds, ``None`` when it does not.
    A rule it cannot judge (no reading: a sensor fault, a machine too old to send it) is left out: an unknown
    reading neither opens nor resolves an alarm."""
    lockouts = [str(x) for x in hb.get("lockouts") or ()]
    out: dict[str, dict[str, Any] | None] = {}
    for rule in ("leak", "ghost_flow", "storage", "hardware", "low_water"):
        mine = sorted(x for x in lockouts if lockout_rule(x) == rule)
        out[rule] = {"lockouts": mine} if mine else None
    dead = hb.get("dead_letters") or 0
    out["dead_letter"] = {"dead_letters": dead} if dead else None
    temp, locked = hb.get("temp_c"), "temperature" in lockouts
    if locked or (temp is not None and not th.temp_min_c <= temp <= th.temp_max_c):
        out["temperature"] = {"temp_c": temp, "band_c": [th.temp_min_c, th.temp_max_c], "locked_out": locked}
    elif temp is not None:
        out["temperature"] = None
    tds, locked = hb.get("tds_ppm"), "tds" in lockouts
    if locked or (tds is not None and tds > th.tds_max_ppm):
        out["tds"] = {"tds_ppm": tds, "max_ppm": th.tds_max_ppm, "locked_out": locked}
    elif tds is not None:
        out["tds"] = None
    if hb.get("consumables") is not None:          # an older machine does not count them: unknown
        for kind in ("filter", "uv_lamp"):
            c = next((c for c in hb["consumables"] if c.get("kind") == kind), None)
            out[f"{kind}_due"] = {k: v for k, v in c.items() if k != "due"} if c and c.get("due") else None
    return out


def alarming(hb: dict[str, Any], th: Thresholds) -> bool:
    """Whether the heartbeat shows any rule's condition (kept as ``machines.alarm_hint`` when it arrives)."""
    return any(cond is not None for cond in heartbeat_conditions(hb, th).values())
