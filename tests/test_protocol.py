"""Golden vectors for the shared protocol: both sides import sync/protocol.py, and these pin it down."""

import hashlib
import hmac
import struct

import pytest
from pydantic import ValidationError

import contract as p

SECRET = bytes(range(16))
BODY = b'{"a":1}'
NONCE = "00112233445566778899aabbccddeeff"


def test_signature_golden_vector():
    assert p.sign(SECRET, "POST", "/device/v1/events?x=1", 1_764_000_000_000, NONCE, BODY) == \
        "c4da924788028d480a921be84e646e6ef789d6b1488d00a07cb0b1ff28a7510b"


def test_signature_is_hmac_sha256_over_the_canonical_request():
    key = hmac.new(SECRET, b"tapshare/request/v1", hashlib.sha256).digest()
    msg = f"POST\n/device/v1/events?x=1\n1764000000000\n{NONCE}\n{hashlib.sha256(BODY).hexdigest()}".encode()
    assert p.sign(SECRET, "post", "/device/v1/events?x=1", 1_764_000_000_000, NONCE, BODY) == \
        hmac.new(key, msg, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("change", ["method", "path", "ts", "nonce", "body", "secret"])
def test_every_signed_part_matters(change):
    args = dict(secret=SECRET, method="POST", path="/x", timestamp_ms=1, nonce=NONCE, body=BODY)
    sig = p.sign(**args)
    changed = {"method": ("method", "PUT"), "path": ("path", "/y"), "ts": ("timestamp_ms", 2),
               "nonce": ("nonce", NONCE[::-1]), "body": ("body", b"{}"), "secret": ("secret", bytes(16))}[change]
    args[changed[0]] = changed[1]
    assert not p.verify_signature(signature=sig, **args)


def test_short_secrets_are_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        p.sign(b"short", "GET", "/", 1, NONCE, b"")


def test_clock_skew():
    assert p.clock_problem(1_000_000, 1_000_000 + 299_000) is None
    assert "off the server's clock" in p.clock_problem(1_000_000, 1_000_000 + 301_000)


def test_qr_golden_vectors():
    assert p.qr_code(SECRET, "M-1", 1_764_000_000) == "23063008"
    assert p.qr_code(SECRET, "M-1", 1_764_000_029) == "23063008"     # same 30 s step
    assert p.qr_code(SECRET, "M-1", 1_764_000_030) == "30055546"     # next step
    assert p.qr_code(SECRET, "M-2", 1_764_000_000) == "46354139"     # bound to the machine


def test_qr_is_the_rfc6238_construction_with_hmac_sha256():
    key = hmac.new(SECRET, b"tapshare/qr/v1", hashlib.sha256).digest()
    mac = hmac.new(key, b"M-1\x00" + struct.pack(">Q", 1_764_000_000 // 30), hashlib.sha256).digest()
    off = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 10**8
    assert p.qr_code(SECRET, "M-1", 1_764_000_000) == f"{code:08d}"


def test_qr_accepts_one_step_of_skew_and_no_more():
    t = 1_764_000_000
    code = p.qr_code(SECRET, "M-1", t)
    assert p.qr_step(SECRET, "M-1", code, t) == t // 30
    assert p.qr_step(SECRET, "M-1", code, t + 30) == t // 30           # one step late: still fine
    assert p.qr_step(SECRET, "M-1", code, t - 30) == t // 30           # device clock a step ahead
    assert p.qr_step(SECRET, "M-1", code, t + 60) is None              # a photo from a minute ago
    assert p.qr_step(SECRET, "M-2", code, t) is None                   # another machine
    for bad in ("", "1234567", "abcdefgh", "123456789", None):
        assert p.qr_step(SECRET, "M-1", bad, t) is None


def test_qr_url():
    assert p.qr_url("https://water.example/", "M-1", "01234567") == "https://water.example/m/M-1?c=01234567"


def test_the_fee_rule_is_the_dispensers():
    from contract.billing import Calibration
    assert p.fee_fen(452, 450_000, 200) == Calibration(450_000).cost_fen(452, 200) == 200
    assert p.volume_ml(450, 450_000) == 1000


def test_messages_refuse_bad_input():
    good = dict(session_id="s1", machine_id="M-1", user_ref="u1", price_fen_per_l=200, credit_limit_fen=500,
                max_volume_ml=5000, max_duration_ms=300_000, max_idle_ms=15_000, deadline_ms=1_800_000_000_000,
                min_dispense_ml=10)
    p.GrantMsg(**good)
    for field, value in [("price_fen_per_l", -1), ("credit_limit_fen", "lots"), ("max_volume_ml", 10**9),
                         ("session_id", "a b"), ("deadline_ms", -1), ("min_dispense_ml", 501)]:
        with pytest.raises(ValidationError):
            p.GrantMsg(**{**good, field: value})
    with pytest.raises(ValidationError):
        p.GrantMsg(**good, extra_field=1)
    with pytest.raises(ValidationError):
        p.DeviceEvent(event_id="not-an-id", kind="x", payload={})


def test_a_heartbeat_may_carry_consumables_and_the_price_shown_and_older_ones_are_still_accepted():
    old = p.HeartbeatMsg.model_validate({"state": "idle", "valve_open": False, "lockouts": [], "dead_letters": 0})
    assert old.consumables is None and old.price_fen_per_l is None
    filt = {"kind": "filter", "used_l": 2_900, "life_l": 3_000, "used_days": 20, "life_days": 180,
            "used_permille": 966, "due": True}
    new = p.HeartbeatMsg.model_validate({"state": "idle", "valve_open": False, "consumables": [filt],
                                         "price_fen_per_l": 230})
    assert new.model_dump()["consumables"] == [filt] and new.price_fen_per_l == 230
    for bad in ({"kind": "membrane"}, {"used_l": -1}, {"due": "yes"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            p.HeartbeatMsg(state="idle", valve_open=False, consumables=[{**filt, **bad}])
    with pytest.raises(ValidationError):
        p.HeartbeatMsg(state="idle", valve_open=False, price_fen_per_l=-1)


# ---------------------------------------------------------------- event kinds, typed details, limits

def test_event_details_golden_vectors():
    """The wire form of typed event details stays fixed (aliases such as "from", an explicit None kept, an
    optional field left out when not given)."""
    K = p.EventKind
    assert K.CALIBRATION_CHANGED.detail_of(**{"from": 450_000, "to": 460_000}, actor="pin", pours=[[450, 1000]]) \
        == {"from": 450_000, "to": 460_000, "actor": "pin", "pours": [[450, 1000]]}
    assert K.PRICE_CHANGED.detail_of(**{"from": None, "to": 200}) == {"from": None, "to": 200}
    assert K.LOCKOUT_CLEARED.detail_of(reason="ghost_flow", source="site", actor="pin") \
        == {"reason": "ghost_flow", "source": "site", "actor": "pin"}
    assert K.LINK_UP.detail_of() == {}


def test_event_kinds_declare_reporting_and_alarms_once():
    K = p.EventKind
    assert K("lockout") is K.LOCKOUT and K.LOCKOUT == "lockout"
    assert K.LOCKOUT.reported and K.LOCKOUT.alarm and not K.LOCKOUT.by_cloud
    assert not K.LINK_DOWN.reported and not K.LINK_DOWN.alarm
    assert {"lockout", "ghost_flow", "report_dead_lettered", "session_start_failed",
                                   "lockout_clear_refused"} == p.ALARM_EVENT_KINDS
    assert {"session_lost", "implausible_report"} == p.CLOUD_ALARM_KINDS
    assert "session_ended" in p.REPORTED_EVENT_KINDS and "tech_pour_started" not in p.REPORTED_EVENT_KINDS
    assert [k.value for k in p.CommandKind] == ["start", "cancel", "price", "out_of_service", "in_service",
                                                "clear_lockout"]


def test_a_detail_that_does_not_match_its_kind_is_refused():
    with pytest.raises(ValidationError):
        p.EventKind.GHOST_FLOW.detail_of(pulses=10)                          # volume_ml missing
    with pytest.raises(ValidationError):
        p.EventKind.GHOST_FLOW.detail_of(pulses=10, volume_ml=22, note="?")  # a field the contract does not know
    with pytest.raises(ValidationError):
        p.EventKind.GHOST_FLOW.detail_of(pulses="10", volume_ml=22)          # no coercion
    envelope = {"event_id": "1-1", "machine_id": "M-1", "boot_id": 1, "created_at": "2026-11-29T10:00:00Z"}
    p.report_payload("ghost_flow", {**envelope, "kind": "ghost_flow", "detail": {"pulses": 10, "volume_ml": 22}})
    with pytest.raises(ValueError, match="unknown event kind"):
        p.report_payload("telemetry", {**envelope, "kind": "telemetry", "detail": {}})
    with pytest.raises(ValueError, match="not reported"):
        p.report_payload("link_up", {**envelope, "kind": "link_up", "detail": {}})
    with pytest.raises(ValidationError):
        p.report_payload("ghost_flow", {**envelope, "kind": "ghost_flow", "detail": {"pulses": 10}})


def test_the_dispenser_records_events_only_by_their_declared_kind():
    """No event kind is spelled as a free string where the dispenser records one (the storage primitive
    itself excepted): a kind must come from the contract, with its detail model and its reporting flag."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in [*(root / "kiosk").rglob("*.py"), root / "main.py", *(root / "sync").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) \
                    and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                    in ("RecordEvent", "record_event", "record", "_event"):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []


GRANT = dict(session_id="s1", machine_id="M-1", user_ref="u1", price_fen_per_l=200, credit_limit_fen=500,
             max_volume_ml=5000, max_duration_ms=300_000, max_idle_ms=15_000, deadline_ms=1_800_000_000_000,
             min_dispense_ml=10)


def test_limits_are_declared_once_and_agree():
    """The dispenser's configuration, the cloud's operator API and the grant take the same bounds."""
    import dataclasses

    from cloud.operators.schemas import MachineSettingsIn, ProvisionIn
    from kiosk.config import LimitsConfig, PricingConfig
    cfg = {f.name: f for f in dataclasses.fields(LimitsConfig)}
    for name, bound in p.LIMIT_BOUNDS.items():
        assert (cfg[name].metadata["min"], cfg[name].metadata["max"], cfg[name].default) \
            == (bound.min, bound.max, bound.default)
        for model, base in [(ProvisionIn, {"machine_id": "M-1", "price_fen_per_l": 200}),
                            (MachineSettingsIn, {}), (p.GrantMsg, GRANT), (p.Limits, {})]:
            for value, ok in [(bound.min - 1, False), (bound.min, True), (bound.max, True), (bound.max + 1, False)]:
                key = "credit_limit_fen" if model is p.GrantMsg and name == "max_credit_fen" else name
                try:
                    model(**{**base, key: value})
                    assert ok, (model.__name__, name, value)
                except ValidationError:
                    assert not ok, (model.__name__, name, value)
    price = dataclasses.fields(PricingConfig)[0].metadata
    assert (price["min"], price["max"]) == (p.PRICE.min, p.PRICE.max)
    assert p.Limits().max_volume_ml == p.LIMIT_BOUNDS["max_volume_ml"].default


def test_free_text_in_an_event_detail_is_cut_to_its_bound_not_refused():
    """Recording what happened must not fail because an error message or an actor's name is long."""
    d = p.EventKind.LOCKOUT.detail_of(reason="fault:internal", detail="Traceback ... " * 100)
    assert len(d["detail"]) == 500 and d["reason"] == "fault:internal"
    d = p.EventKind.MAINTENANCE_ENTERED.detail_of(actor="技术员" * 40)
    assert d["actor"] == ("技术员" * 40)[:64]
    d = p.EventKind.CALIBRATION_CHANGED.detail_of(**{"from": 450_000, "to": 451_000}, actor="pin",
                                                  pours=[[450, 1000]] * 25)
    assert len(d["pours"]) == 25                                        # a long calibration is recorded whole
