"""The cloud's settings, in one validated object. Every value comes from a keyword (tests, the embedded cloud)
or from its ``TAPSHARE_*`` environment variable; a bad value stops start-up with :class:`SettingsError`
naming the variable (``TAPSHARE_OPERATOR_TOKEN_DAYS: must be a whole number from 1 to 3650, got 'ninety'``)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cloud.accounts.providers import DevAutoVerify, DevSmsSink, ManualReview, SmsProvider, Verifier
from cloud.alarms.notify import NotifySettings
from cloud.alarms.rules import Thresholds
from cloud.cluster import instance_id
from cloud.errors import ProviderConfigError
from cloud.security import SecretBox
from cloud.wallet.payments import PaymentProvider, SandboxPay

_ADDRESS = re.compile(r"[^@\s,<>]+@[^@\s,<>]+")


class SettingsError(ValueError):
    """A setting is missing or out of range; the message names its environment variable."""


class ProductionRefused(SettingsError):
    """Production mode with a development provider, or without what production needs."""


# numeric settings: (environment variable, default, low, high), checked whether they come from a keyword or
# from the environment
_NUMBERS: dict[str, tuple[str, float, float, float]] = {
    "photo_retention_days": ("TAPSHARE_ID_PHOTO_RETENTION_DAYS", 30, 0, 3650),   # 0: at the next purge
    # commands to machines (starts, stops, prices ...), answered or expired, are deleted this long after they were
    # queued (the console's command view and an operator's "what became of it" look back this far)
    "command_retention_days": ("TAPSHARE_COMMAND_RETENTION_DAYS", 7, 1, 3650),
    # the step-by-step history of a fleet update's machines is deleted this long after its rollout ended (stopped
    # or done); each machine's outcome in it (machine_updates) is kept
    "update_history_days": ("TAPSHARE_UPDATE_HISTORY_DAYS", 365, 1, 36_500),
    "operator_token_days": ("TAPSHARE_OPERATOR_TOKEN_DAYS", 90, 1, 36_500),
    "scans_per_minute_per_network": ("TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK", 30, 1, 100_000_000),
    "scans_per_minute_per_machine": ("TAPSHARE_SCANS_PER_MINUTE_PER_MACHINE", 120, 1, 100_000_000),
    "header_timeout_s": ("TAPSHARE_HEADER_TIMEOUT_S", 10.0, 1, 600),
    # operators' alarms (cloud/alarms): how often the rules are checked and notifications sent, their thresholds
    "alarm_check_interval_s": ("TAPSHARE_ALARM_CHECK_INTERVAL_S", 5.0, 0.05, 3600),
    "alarm_offline_after_s": ("TAPSHARE_ALARM_OFFLINE_AFTER_S", 300, 1, 30 * 86_400),
    "alarm_temp_min_c": ("TAPSHARE_ALARM_TEMP_MIN_C", 2.0, -20, 60),
    "alarm_temp_max_c": ("TAPSHARE_ALARM_TEMP_MAX_C", 30.0, -20, 100),
    "alarm_tds_max_ppm": ("TAPSHARE_ALARM_TDS_MAX_PPM", 400, 1, 10_000),
    "alarm_notify_retry_s": ("TAPSHARE_ALARM_NOTIFY_RETRY_S", 30.0, 0.01, 3600),
    "smtp_port": ("TAPSHARE_SMTP_PORT", 587, 1, 65_535),
    # stopping (SIGTERM): how long /healthz says 503 while this instance still serves, before it stops taking
    # requests, so the load balancer moves new ones elsewhere first (a few of its health-check intervals)
    "drain_s": ("TAPSHARE_DRAIN_S", 0.0, 0, 120),
    # PostgreSQL: how often an instance looks for commands whose notification it missed (the longest such a
    # command can wait)
    "command_recheck_s": ("TAPSHARE_COMMAND_RECHECK_S", 5.0, 0.1, 600),
    # a serving process's full garbage collections: one this often instead of whenever CPython decides (which,
    # holding thousands of long-polls, was a pause of up to 2 s every few seconds: cloud/gc_policy.py); 0 keeps
    # CPython's defaults
    "gc_full_every_s": ("TAPSHARE_GC_FULL_EVERY_S", 300.0, 0, 86_400),
}


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _number(name: str) -> Any:
    var, default, low, high = _NUMBERS[name]

    def read() -> float:
        raw = os.environ.get(var, "").strip()
        if not raw:
            return default
        try:
            value = type(default)(raw)
        except ValueError:
            kind = "a whole number" if isinstance(default, int) else "a number"
            raise SettingsError(f"{var}: must be {kind} from {_show(low)} to {_show(high)}, got {raw[:40]!r}") from None
        return value
    return field(default_factory=read)


def _text(name: str, default: str = "") -> Callable[[], str]:
    return lambda: os.environ.get(name, default)


def _flag(name: str, default: bool = False) -> Callable[[], bool]:
    def read() -> bool:
        raw = os.environ.get(name, "").strip()
        if raw not in ("", "0", "1"):
            raise SettingsError(f"{name}: must be 1 (on) or 0 (off), got {raw[:40]!r}")
        return default if raw == "" else raw == "1"
    return read


def _secret_file(var: str, path: str) -> str | None:
    """The secret in the file ``path`` names (None when not set); a file that is named but cannot be read, or is
    empty, stops start-up."""
    if not path:
        return None
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{var}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise SettingsError(f"{var}: {path} is empty")
    return secret


@dataclass
class CloudSettings:
    database_url: str = ""          # empty: TAPSHARE_DATABASE_URL, or else SQLite in data_dir
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("TAPSHARE_DATA_DIR", "data/cloud")))
    public_url: str = field(default_factory=_text("TAPSHARE_PUBLIC_URL", "http://127.0.0.1:8700"))
    production: bool = field(default_factory=_flag("TAPSHARE_PRODUCTION"))
    background_interval_s: float = 1.0
    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    # None picks the development providers, which production mode refuses
    sms_provider: SmsProvider | None = None
    verifier: Verifier | None = None
    payment_provider: PaymentProvider | None = None     # one provider (tests); or:
    payment_providers: list[PaymentProvider] | None = None
    # by name, from the environment: TAPSHARE_PAYMENT_PROVIDERS=wechatpay,alipay (each reads its own
    # TAPSHARE_WECHATPAY_* / TAPSHARE_ALIPAY_* credentials) and TAPSHARE_SMS_PROVIDER=tencent; empty: the
    # development sandbox and SMS sink, which production mode refuses
    payment_provider_names: str = field(default_factory=_text("TAPSHARE_PAYMENT_PROVIDERS"))
    sms_provider_name: str = field(default_factory=_text("TAPSHARE_SMS_PROVIDER"))
    id_verify: str = field(default_factory=_text("TAPSHARE_ID_VERIFY"))   # manual or dev_auto; empty: by mode
    photo_retention_days: int = _number("photo_retention_days")
    command_retention_days: int = _number("command_retention_days")
    update_history_days: int = _number("update_history_days")
    timezone: str = "Asia/Shanghai"
    # who handles the personal information (named in the consent text and the user agreement, as PIPL requires)
    operator_name: str = field(default_factory=_text("TAPSHARE_OPERATOR_NAME"))
    operator_contact: str = field(default_factory=_text("TAPSHARE_OPERATOR_CONTACT"))
    header_timeout_s: float = _number("header_timeout_s")
    drain_s: float = _number("drain_s")
    command_recheck_s: float = _number("command_recheck_s")
    gc_full_every_s: float = _number("gc_full_every_s")
    # this instance's name among several (leases of background jobs, /healthz, logs)
    instance_id: str = field(default_factory=instance_id)
    operator_token_days: int = _number("operator_token_days")
    scans_per_minute_per_network: int = _number("scans_per_minute_per_network")
    scans_per_minute_per_machine: int = _number("scans_per_minute_per_machine")
    # operators' alarms: the rules' thresholds (the machine has its own, and locks itself out past them). The
    # temperature band warns before the machine's own lockout (35 C by default), as stored water warmer than 25-30 C
    # lets bacteria grow; 50 mg/L TDS after reverse osmosis means a membrane wearing out, long before the
    # 500 mg/L limit of purified drinking water (CJ 94) the machine locks itself out at.
    alarm_check_interval_s: float = _number("alarm_check_interval_s")
    alarm_offline_after_s: int = _number("alarm_offline_after_s")
    alarm_temp_min_c: float = _number("alarm_temp_min_c")
    alarm_temp_max_c: float = _number("alarm_temp_max_c")
    alarm_tds_max_ppm: int = _number("alarm_tds_max_ppm")
    # ... and where they are sent: email (empty host: none) and a webhook (empty URL: none), of alarms at least
    # this severe (critical, warning or info), retried after alarm_notify_retry_s, doubling
    alarm_notify_min_severity: str = field(default_factory=_text("TAPSHARE_ALARM_NOTIFY_MIN_SEVERITY", "warning"))
    alarm_notify_retry_s: float = _number("alarm_notify_retry_s")
    smtp_host: str = field(default_factory=_text("TAPSHARE_SMTP_HOST"))
    smtp_port: int = _number("smtp_port")
    smtp_starttls: bool = field(default_factory=_flag("TAPSHARE_SMTP_STARTTLS", default=True))
    smtp_user: str = field(default_factory=_text("TAPSHARE_SMTP_USER"))
    smtp_password_file: str = field(default_factory=_text("TAPSHARE_SMTP_PASSWORD_FILE"))
    alarm_email_from: str = field(default_factory=_text("TAPSHARE_ALARM_EMAIL_FROM"))
    alarm_email_to: str = field(default_factory=_text("TAPSHARE_ALARM_EMAIL_TO"))      # addresses, comma-separated
    alarm_webhook_url: str = field(default_factory=_text("TAPSHARE_ALARM_WEBHOOK_URL"))
    alarm_webhook_secret_file: str = field(default_factory=_text("TAPSHARE_ALARM_WEBHOOK_SECRET_FILE"))
    # fleet updates: the public keys (*.pub.pem) whose signatures an uploaded release bundle may carry, read at
    # each upload; empty: data_dir/release-keys
    release_keys_dir: Path | str = field(default_factory=_text("TAPSHARE_RELEASE_KEYS_DIR"))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.release_keys_dir = Path(self.release_keys_dir or self.data_dir / "release-keys")
        self.database_url = self.database_url or os.environ.get("TAPSHARE_DATABASE_URL", "")
        for name, (var, _default, low, high) in _NUMBERS.items():
            if not low <= getattr(self, name) <= high:
                raise SettingsError(f"{var}: must be from {_show(low)} to {_show(high)}, got {getattr(self, name)!r}")
        if not self.public_url.startswith(("http://", "https://")):
            raise SettingsError(f"TAPSHARE_PUBLIC_URL: must start with http:// or https://, got {self.public_url!r}")
        if self.id_verify not in ("", "manual", "dev_auto"):
            raise SettingsError(f"TAPSHARE_ID_VERIFY: must be manual or dev_auto, got {self.id_verify!r}")
        if self.database_url and not self.database_url.startswith(("sqlite", "postgresql")):
            raise SettingsError("the database URL (--database-url or TAPSHARE_DATABASE_URL): must be a sqlite:/// "
                                f"or postgresql+psycopg:// URL, got {self.database_url.split(':')[0][:20]!r}")
        try:
            ZoneInfo(self.timezone)
        except (ValueError, KeyError, OSError) as e:
            raise SettingsError(f"timezone: unknown time zone {self.timezone!r}") from e
        self._check_alarms()

    def _check_alarms(self) -> None:
        if self.alarm_temp_min_c >= self.alarm_temp_max_c:
            raise SettingsError("TAPSHARE_ALARM_TEMP_MIN_C: must be below TAPSHARE_ALARM_TEMP_MAX_C, got "
                                f"{self.alarm_temp_min_c:g} and {self.alarm_temp_max_c:g}")
        if self.alarm_notify_min_severity not in ("critical", "warning", "info"):
            raise SettingsError("TAPSHARE_ALARM_NOTIFY_MIN_SEVERITY: must be critical, warning or info, got "
                                f"{self.alarm_notify_min_severity[:40]!r}")
        sender = self.alarm_email_from
        if sender and (not _ADDRESS.fullmatch(parseaddr(sender)[1]) or "\n" in sender or "\r" in sender):
            raise SettingsError(f"TAPSHARE_ALARM_EMAIL_FROM: not an email address: {sender[:80]!r}")
        for address in self.email_to():
            if not _ADDRESS.fullmatch(address):
                raise SettingsError(f"TAPSHARE_ALARM_EMAIL_TO: not an email address: {address[:80]!r} (give bare "
                                    "addresses, comma-separated)")
        if self.smtp_host and not (self.alarm_email_from and self.email_to()):
            raise SettingsError("TAPSHARE_SMTP_HOST is set: TAPSHARE_ALARM_EMAIL_FROM and TAPSHARE_ALARM_EMAIL_TO "
                                "must say who sends the alarms and who gets them")
        if not self.smtp_host and self.email_to():
            raise SettingsError("TAPSHARE_ALARM_EMAIL_TO is set but TAPSHARE_SMTP_HOST is not: no alarm could be sent")
        if self.alarm_webhook_url and not self.alarm_webhook_url.startswith(("http://", "https://")):
            raise SettingsError(f"TAPSHARE_ALARM_WEBHOOK_URL: must start with https:// (or http:// in development), "
                                f"got {self.alarm_webhook_url[:80]!r}")

    def email_to(self) -> list[str]:
        return [x.strip() for x in self.alarm_email_to.split(",") if x.strip()]

    def alarm_thresholds(self) -> Thresholds:
        return Thresholds(self.alarm_temp_min_c, self.alarm_temp_max_c, self.alarm_tds_max_ppm)

    def notify_settings(self) -> NotifySettings:
        """Where alarms are sent, with the SMTP password and the webhook's signing secret read from their files."""
        secret = _secret_file("TAPSHARE_ALARM_WEBHOOK_SECRET_FILE", self.alarm_webhook_secret_file)
        return NotifySettings(
            smtp_host=self.smtp_host, smtp_port=self.smtp_port, smtp_starttls=self.smtp_starttls,
            smtp_user=self.smtp_user, smtp_password=_secret_file("TAPSHARE_SMTP_PASSWORD_FILE",
                                                                 self.smtp_password_file),
            email_from=self.alarm_email_from, email_to=tuple(self.email_to()), webhook_url=self.alarm_webhook_url,
            webhook_secret=secret.encode() if secret is not None else None,
            min_severity=self.alarm_notify_min_severity, retry_s=self.alarm_notify_retry_s, timezone=self.timezone)

    def url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'cloud.db').resolve()}"

    def providers(self, box: SecretBox) -> tuple[SmsProvider, Verifier, dict[str, PaymentProvider]]:
        """The configured providers, their credentials checked now; production mode refuses every development
        one, with the reason."""
        sms = self.sms_provider or self._sms_from_env()
        mode = self.id_verify or ("manual" if self.production else "dev_auto")
        verifier = self.verifier or (DevAutoVerify() if mode == "dev_auto" else ManualReview())
        pays = list(self.payment_providers or ([self.payment_provider] if self.payment_provider else []))
        if not pays:
            pays = self._payments_from_env(box)
        by_name = {p.name: p for p in pays}
        if self.production:
            problems = [f"{what} is the development {p.name}" for what, p in
                        (("the SMS provider", sms), ("identity verification", verifier),
                         *(("a payment provider", p) for p in pays)) if p.is_development]
            if not self.operator_name.strip() or not self.operator_contact.strip():
                problems.append("TAPSHARE_OPERATOR_NAME and TAPSHARE_OPERATOR_CONTACT must name who handles personal "
                                "information and how to reach them")
            if not self.public_url.startswith("https://"):
                problems.append(f"TAPSHARE_PUBLIC_URL must be https:// (is {self.public_url})")
            if self.alarm_webhook_url and not self.alarm_webhook_url.startswith("https://"):
                problems.append(f"TAPSHARE_ALARM_WEBHOOK_URL must be https:// (is {self.alarm_webhook_url[:80]})")
            if self.alarm_webhook_url and not self.alarm_webhook_secret_file:
                problems.append("TAPSHARE_ALARM_WEBHOOK_SECRET_FILE must name the file of the secret that signs the "
                                "alarm webhooks")
            if self.smtp_host and self.smtp_user and not self.smtp_starttls and self.smtp_port != 465:
                problems.append("TAPSHARE_SMTP_STARTTLS is off: the SMTP password would cross the network in clear")
            if problems:
                raise ProductionRefused("production mode refuses to start: " + "; ".join(problems))
        return sms, verifier, by_name

    def _sms_from_env(self) -> SmsProvider:
        name = self.sms_provider_name.strip()
        if name in ("", "dev_sink"):
            return DevSmsSink()
        if name == "tencent":
            from cloud.accounts import sms_tencent
            try:
                return sms_tencent.from_env(os.environ)
            except ProviderConfigError as e:
                raise SettingsError(str(e)) from None
        raise SettingsError(f"TAPSHARE_SMS_PROVIDER: must be tencent or dev_sink, got {name[:40]!r}")

    def _payments_from_env(self, box: SecretBox) -> list[PaymentProvider]:
        names = [n.strip() for n in self.payment_provider_names.split(",") if n.strip()] or ["sandbox"]
        out: list[PaymentProvider] = []
        for name in names:
            if name in (p.name for p in out):
                raise SettingsError(f"TAPSHARE_PAYMENT_PROVIDERS: {name} is listed twice")
            try:
                if name == "wechatpay":
                    from cloud.wallet import wechatpay
                    out.append(wechatpay.from_env(os.environ))
                elif name == "alipay":
                    from cloud.wallet import alipay
                    out.append(alipay.from_env(os.environ))
                elif name == "sandbox":
                    out.append(SandboxPay(box.subkey("sandbox-pay")))
                else:
                    raise SettingsError(f"TAPSHARE_PAYMENT_PROVIDERS: must list wechatpay, alipay or sandbox, "
                                        f"got {name[:40]!r}")
            except ProviderConfigError as e:
                raise SettingsError(str(e)) from None
        return out
