"""Tapshare dispenser: wiring only. Reads the config, builds hal + core + ledger + sync + UI, runs.

    python main.py --simulate --embedded-cloud      the whole system on a desktop: cloud, kiosk window, phone pages
    python main.py --simulate --headless            simulated machine and users, logs what happens
    python main.py --status                         lockouts, open sessions, totalizer, outbox
    python main.py --clear-lockout ghost_flow       a technician clears a lockout on site
    python main.py --print-config                   the effective configuration, every key documented
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from hal.base import SystemClock
from kiosk import config as config_mod
from kiosk.ledger import Ledger, LedgerError
from kiosk.ports import Valve
from kiosk.runtime import Runtime, boot
from kiosk.version import running_version

log = logging.getLogger("tapshare")

EXIT_CONFIG = 2
EXIT_STORAGE = 3
EXIT_HARDWARE = 4


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 <= MIN <= MAX, got {text!r}")
    return a, b


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="main.py", description="Tapshare shared drinking-water dispenser.")
    p.add_argument("--config", help="TOML configuration file (default: documented defaults)")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--simulate", action="store_true", help="simulated hardware and users (desktop)")
    p.add_argument("--headless", action="store_true", help="no window: the same core and threads, logs only")
    p.add_argument("--embedded-cloud", action="store_true",
                   help="with --simulate: run the reference cloud in this process (data in <data_dir>/cloud), "
                        "enrol this machine with it and serve the phone pages")
    p.add_argument("--demo-fleet", action="store_true",
                   help="with --embedded-cloud: on a fresh data folder, seed a demo fleet for the operators' console "
                        "(python -m cloud demo-data) and print how to sign in to it")
    p.add_argument("--cloud-host", default="127.0.0.1", help="with --embedded-cloud: address to listen on")
    p.add_argument("--cloud-port", type=int, default=8700, help="with --embedded-cloud: port (0: any free port)")
    p.add_argument("--public-url", default="",
                   help="with --embedded-cloud: the URL phones use (e.g. http://192.168.1.20:8700 for a phone on "
                        "the same network; default: the local URL)")
    p.add_argument("--sessions", type=int, default=0, help="with --simulate: stop after N sessions (0: run on)")
    p.add_argument("--seed", type=int, default=None, help="with --simulate: random seed")
    p.add_argument("--pour-ms", type=_range, default=(1_500, 6_000), metavar="MIN:MAX",
                   help="with --simulate: how long simulated users pour")
    p.add_argument("--pause-ms", type=_range, default=(500, 2_000), metavar="MIN:MAX",
                   help="with --simulate: pause between simulated users")
    p.add_argument("--flow-ml-per-min", type=_range, default=(4_000, 8_000), metavar="MIN:MAX",
                   help="with --simulate: simulated flow rate")
    p.add_argument("--trace", action="store_true", help="print machine-readable JSON lines on stdout")
    p.add_argument("--status", action="store_true", help="print the ledger's state and exit")
    p.add_argument("--clear-lockout", metavar="REASON", help="clear a lockout on site (e.g. ghost_flow)")
    p.add_argument("--actor", default="cli", help="who runs --clear-lockout (logged)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--provision", metavar="ENROLMENT_TOKEN",
                   help="register this machine (machine.id) with the cloud (cloud.url) and store its secret")
    p.add_argument("--force", action="store_true", help="with --provision: replace an existing secret")
    p.add_argument("--set-maintenance-pin", action="store_true",
                   help="set the technicians' PIN (6-8 digits; from TAPSHARE_MAINTENANCE_PIN or asked for)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    if args.data_dir:
        cfg = cfg.replace(paths={"data_dir": args.data_dir})
    return cfg


def admin(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    clock = SystemClock()
    try:
        ledger = Ledger.open(cfg.db_path, machine_id=cfg.machine.id, wall_clock=clock.wall_ms, new_boot=False)
    except LedgerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    try:
        if args.clear_lockout:
            locked = ledger.lockouts()
            if args.clear_lockout not in locked:
                print(f"error: no lockout {args.clear_lockout!r}; active: {', '.join(locked) or 'none'}",
                      file=sys.stderr)
                return 1
            ledger.queue_admin_command("clear_lockout", {"reason": args.clear_lockout, "actor": args.actor})
            print(f"queued: clear {args.clear_lockout} (the running dispenser applies it within a second; "
                  "otherwise at its next start)")
        if args.status:
            print(json.dumps({
                "db": str(cfg.db_path), "lockouts": ledger.lockouts(),
                "open_sessions": [s["session_id"] for s in ledger.sessions("open")],
                "ended_sessions": len(ledger.sessions("ended")),
                "totalizer_pulses": ledger.totalizer_pulses(), "outbox_pending": ledger.outbox_depth(),
                "outbox_dead": [{"event_id": r["event_id"], "error": r["last_error"]}
                                for r in ledger.outbox("dead")],
            }, indent=2, ensure_ascii=False))
        return 0
    finally:
        ledger.close()


def provision(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from sync.client import SyncError, enroll
    from sync.secret import SecretFileError, write_secret
    if cfg.secret_path.exists() and not args.force:
        print(f"error: {cfg.secret_path} exists: already provisioned (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        secret = enroll(cfg.cloud.url, cfg.machine.id, args.provision)
        write_secret(cfg.secret_path, secret, overwrite=args.force)
    except (SyncError, SecretFileError) as e:
        print(f"error: provisioning failed: {e}", file=sys.stderr)
        return 1
    print(f"provisioned {cfg.machine.id} with {cfg.cloud.url}; secret stored in {cfg.secret_path} (mode 0600)")
    return 0


def set_maintenance_pin(cfg: config_mod.Config) -> int:
    import getpass

    from kiosk.ledger import Ledger, LedgerError
    from kiosk.maintenance import store_pin
    from kiosk.pin import PinError
    pin = os.environ.get("TAPSHARE_MAINTENANCE_PIN")
    if not pin:
        try:
            pin = getpass.getpass("new maintenance PIN (6-8 digits): ")
        except EOFError:
            print("error: no PIN: set TAPSHARE_MAINTENANCE_PIN, or run this on a terminal to be asked", file=sys.stderr)
            return EXIT_CONFIG
    try:
        ledger = Ledger.open(cfg.db_path, machine_id=cfg.machine.id, wall_clock=SystemClock().wall_ms, new_boot=False)
    except LedgerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    try:
        store_pin(ledger, pin, actor="cli")
    except PinError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LedgerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        ledger.close()
    print("maintenance PIN set (only its scrypt hash is stored)")
    return 0


def start_link(cfg: config_mod.Config, runtime, clock):
    """The cloud link, if this machine is provisioned; else ``None`` (and why)."""
    from sync.client import CloudClient
    from sync.link import SyncLink
    from sync.secret import SecretFileError, read_secret
    try:
        secret = read_secret(cfg.secret_path)
    except SecretFileError as e:
        log.error("NOT CONNECTING TO THE CLOUD: %s", e)
        return None
    if secret is None or runtime.ledger is None:
        return None
    client = CloudClient(cfg.cloud.url, cfg.machine.id, secret, wall_ms=clock.wall_ms, mono_ms=clock.monotonic_ms,
                         timeout_s=cfg.cloud.request_timeout_ms / 1000)
    link = SyncLink(runtime, client, runtime.ledger, software_version=running_version(),
                    poll_wait_ms=cfg.cloud.poll_wait_ms,
                    heartbeat_interval_ms=cfg.cloud.heartbeat_interval_ms,
                    link_lost_after_ms=cfg.cloud.link_lost_after_ms)
    link.updater = start_updater(cfg, runtime, client)
    link.start()
    log.info("cloud link to %s started (software %s)", cfg.cloud.url, running_version())
    return link


def start_updater(cfg: config_mod.Config, runtime, client):
    """Fleet updates: the offers in heartbeat answers, fetched and checked here, installed by root's applier."""
    from sync.updater import Updater, default_paths
    paths = default_paths(cfg.data_dir)
    try:
        updater = Updater(runtime, client, running_version=running_version(), **paths)
        updater.start()
    except OSError as e:
        log.error("fleet updates off: %s", e)
        return None
    return updater


def start_embedded_cloud(cfg: config_mod.Config, args: argparse.Namespace):
    """The desktop simulation's cloud: started in-process, this machine enrolled, the config pointed at it."""
    from cloud.embedded import EmbeddedCloud, EmbeddedCloudError
    from sync.secret import write_secret
    embedded = EmbeddedCloud(cfg.data_dir / "cloud", host=args.cloud_host, port=args.cloud_port,
                             public_url=args.public_url)
    url = embedded.start()
    secret = embedded.ensure_machine(cfg.machine.id, cfg.pricing.display_price_fen_per_l)
    if secret is not None:
        write_secret(cfg.secret_path, secret, overwrite=True)
    elif not cfg.secret_path.exists():
        embedded.stop()
        raise EmbeddedCloudError(f"the embedded cloud knows {cfg.machine.id} but {cfg.secret_path} is gone: "
                                 f"remove {cfg.data_dir} to start the simulation afresh")
    cfg = cfg.replace(cloud={"url": url, "public_url": embedded.public_url})
    link = embedded.demo_link(cfg.machine.id)
    console = ""
    if args.demo_fleet:
        if secret is not None:
            print("  seeding a demo fleet for the operators' console (first start) ...", flush=True)
        name, password = embedded.demo_fleet(seed=secret is not None)
        console = f"  Operators' console: {url}/console  name: {name}  password: {password}  (development only)\n"
    print(f"\n  Tapshare is running. Phone page for machine {cfg.machine.id} (open it in a browser):\n    {link}\n"
          f"  (the QR code on the kiosk screen opens the same page; operators: {url}/docs)\n{console}", flush=True)
    return embedded, cfg


def run_window(cfg: config_mod.Config, runtime, link, world, phone_link: str, ui_hooks: dict) -> None:
    """The Kivy touchscreen UI on this (the main) thread until the window closes or the runtime stops."""
    from kiosk.ui.app import build_app, configure_window
    configure_window(cfg.screen.layout, fullscreen=cfg.screen.fullscreen, simulate=world is not None,
                     touch_input=cfg.screen.touch_input, rotation_deg=cfg.screen.rotation_deg)
    public = cfg.public_url

    def qr_url() -> str | None:
        return None if link is None else link.current_qr_url(public)

    from kiosk.maintenance import MaintenanceService
    service = MaintenanceService(cfg, runtime, link) if runtime.ledger is not None else None
    app = build_app(runtime, layout=cfg.screen.layout, language=cfg.screen.language,
                    receipt_display_ms=cfg.screen.receipt_display_ms, qr_url=qr_url, sim_world=world,
                    phone_link=phone_link, on_stop=lambda: runtime.request_stop("window closed"), service=service,
                    maintenance_timeout_ms=cfg.maintenance.timeout_ms)
    ui_hooks["long_press"] = app.request_pin_pad       # the stop button held while idle opens the PIN pad
    if ui_hooks.get("diag") is not None:
        from kiosk.ui.app import ui_figures
        ui_hooks["diag"].providers["ui"] = ui_figures
    ui_hooks["ticks"] = lambda: app.ticks              # the systemd watchdog waits for the UI's clock too
    from kivy.core.window import Window

    def first_frame(*_args) -> None:
        Window.unbind(on_flip=first_frame)
        ui_hooks.get("first_frame", lambda: None)()

    Window.bind(on_flip=first_frame)
    app.run()


def foreign_data_dir(cfg: config_mod.Config) -> str | None:
    """Why root must not touch this data dir, or None. Files root creates in the service user's data dir (the
    ledger, its -wal and -shm) stay root's, and the service then fails with "readonly database"."""
    if os.geteuid() != 0:
        return None
    try:
        uid = cfg.data_dir.stat().st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = str(uid)
    return (f"{cfg.data_dir} belongs to {owner}, and files root made there would lock the service out of its "
            f"ledger: run this as that user (sudo -u {owner} ...)")


def run_command(cfg: config_mod.Config, args: argparse.Namespace) -> int | None:
    """A one-shot command (print the config, status, clear a lockout, provision, set the PIN): its exit code;
    ``None`` when the dispenser is to run."""
    if args.print_config:
        print(config_mod.to_toml(cfg))
        return 0
    if args.provision:
        return provision(cfg, args)                # writes the secret file only, never the ledger
    refused = foreign_data_dir(cfg)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG
    if args.status or args.clear_lockout:
        return admin(cfg, args)
    if args.set_maintenance_pin:
        return set_maintenance_pin(cfg)
    return None


def json_trace():
    """A trace that prints each record as one JSON line on stdout (from any thread)."""
    lock = threading.Lock()

    def trace(record: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    return trace


def build_hardware(cfg: config_mod.Config, args: argparse.Namespace, post, hooks: dict):
    """The machine's hardware, or a disconnected valve and meter if it is unavailable (the machine then stays out of
    service): ``(hw, valve, meter, hardware error)``. Its stop button reaches ``hooks`` once they are filled in."""
    from hal.base import DisconnectedMeter, DisconnectedValve
    from hal.machine import HardwareError, build
    try:
        hw = build(cfg, post=post, on_stop_press=lambda: hooks.get("stop_press", lambda: None)(),
                   on_stop_long_press=lambda: hooks.get("long_press", lambda: None)(),
                   simulate=args.simulate, sim_dir=cfg.data_dir / "sim", sim_seed=args.seed)
    except HardwareError as e:
        log.error("HARDWARE UNAVAILABLE, machine out of service: %s", e)
        return None, DisconnectedValve(), DisconnectedMeter(), str(e)
    return hw, hw.valve, hw.meter, None


def stop_on_signals(runtime) -> None:
    """SIGTERM and SIGINT stop the runtime: the valve closes, any session ends."""
    def on_signal(signum: int, _frame: object) -> None:
        log.warning("signal %s: stopping (valve closes, any session ends)", signal.Signals(signum).name)
        runtime.request_stop(signal.Signals(signum).name.lower())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def start_watchdog(runtime, hooks: dict):
    """systemd's watchdog, fed while the core thread and the UI's clock both move (``None`` without one)."""
    from kiosk import systemd
    period = systemd.watchdog_period_s()
    if not period:
        return None
    watchdog = systemd.Watchdog({"core": lambda: runtime.loop_count,
                                 "ui": lambda: hooks["ticks"]() if "ticks" in hooks else None}, period)
    watchdog.start()
    return watchdog


def start_diagnostics(runtime, link, events):
    """Soak diagnostics (``TAPSHARE_DIAG_FILE``, see kiosk/diag.py), or ``None`` when not asked for: this
    process's figures and its long-lived collections' sizes as JSON lines; SIGUSR1 writes one at once."""
    from kiosk.diag import Diagnostics
    diag = Diagnostics.from_env()
    if diag is None:
        return None
    diag.providers["core"] = runtime.core.collection_sizes
    diag.providers["runtime"] = lambda: {"events_queued": events.qsize(), "listeners": len(runtime.listeners)}
    if link is not None:
        diag.providers["link"] = link.collection_sizes
    diag.install_signal()
    diag.start()
    return diag


@dataclass
class Dispenser:
    """The running dispenser's parts: what :func:`run_dispenser` started, and stops in order."""

    runtime: Runtime
    valve: Valve
    hw: Any = None                      # hal.machine.Hardware (None: the hardware is unavailable)
    link: Any = None                    # sync.link.SyncLink (None: not provisioned)
    watchdog: Any = None
    users: Any = None                   # simulated users (the desktop simulation without a cloud)
    diag: Any = None                    # kiosk.diag.Diagnostics (TAPSHARE_DIAG_FILE; None: off)
    embedded: Any = None                # the desktop simulation's in-process cloud

    def run_until_stopped(self, cfg: config_mod.Config, args: argparse.Namespace, hooks: dict) -> None:
        """Headless: until the runtime stops. Else the window, until it closes (the runtime then stops)."""
        runtime = self.runtime
        if args.headless:
            while not runtime.wait_stopped(0.2):
                pass
            return
        run_window(cfg, runtime, self.link, self.hw.world if self.hw is not None else None,
                   self.embedded.demo_link(cfg.machine.id) if self.embedded else "", hooks)
        runtime.request_stop("window closed")
        if not runtime.wait_stopped(5):     # stop() closes the valve and the hardware whatever the core does
            log.error("the core did not stop within 5 s of the window closing: the valve is closed without it")

    def stop(self) -> None:
        from kiosk import systemd
        systemd.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.diag is not None:
            self.diag.stop()
        if self.users is not None:
            self.users.halt()
        if self.link is not None:
            self.link.stop(flush_s=3.0)
            if self.link.updater is not None:
                self.link.updater.stop()
        if self.hw is not None:
            self.hw.close()
        self.valve.close()
        if self.runtime.ledger is not None:
            self.runtime.ledger.close()
        if self.embedded is not None:
            self.embedded.stop()


def service_status(ledger_error: str | None, hw_error: str | None) -> str:
    """systemd's status line once the first frame is drawn. It begins "serving" only when the ledger was opened
    and written by this user; deploy.sh waits for that before it calls a release live."""
    if ledger_error:
        return f"ledger unavailable, out of service: {ledger_error}"
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    status = f"serving: first frame drawn, ledger written as {user}"
    return f"{status}; out of service: hardware unavailable: {hw_error}" if hw_error else status


def run_dispenser(cfg: config_mod.Config, args: argparse.Namespace, embedded) -> int:
    """Build and run the dispenser (real or simulated hardware) until it is stopped; the exit code."""
    import queue

    from hal.machine import simulated_config
    from hal.sim_users import SimulatedUsers
    from kiosk import systemd

    if args.simulate:
        cfg = simulated_config(cfg)
    clock = SystemClock()
    events: queue.Queue = queue.Queue()
    trace = json_trace() if args.trace else None
    hooks: dict = {}                    # entry points for hardware callbacks, filled in as they come to exist
    hw, valve, meter, hw_error = build_hardware(cfg, args, events.put, hooks)
    runtime, report = boot(cfg, valve, meter, clock, trace=trace, events=events,
                           lockouts={"fault:hardware": hw_error} if hw_error else None)
    hooks["stop_press"] = runtime.stop_pressed
    stop_on_signals(runtime)                      # before "ready": a SIGTERM right after it is handled
    if trace:
        trace({"t": "ready", "recovered": [r.session_id for r in report.recovered],
               "ledger_error": report.ledger_error, "hardware_error": hw_error,
               "state": runtime.snapshot.state.value})
    threading.Thread(target=runtime.run, name="core", daemon=True).start()
    if hw is not None:
        hw.start()
    healthy = report.ledger_error is None and hw_error is None
    d = Dispenser(runtime, valve, hw=hw, embedded=embedded, link=start_link(cfg, runtime, clock))
    d.watchdog = start_watchdog(runtime, hooks)
    d.diag = hooks["diag"] = start_diagnostics(runtime, d.link, events)
    serving = service_status(report.ledger_error, hw_error)
    if args.headless:
        systemd.notify(f"READY=1\nSTATUS={serving}")
    else:
        systemd.notify("READY=1\nSTATUS=starting: ledger written, waiting for the first frame")
        hooks["first_frame"] = lambda: systemd.notify(f"STATUS={serving}")
    if d.link is None and healthy and hw is not None and hw.world is not None:
        d.users = SimulatedUsers(runtime, hw.world, clock, sessions=args.sessions, seed=args.seed,
                                 pour_ms=args.pour_ms, pause_ms=args.pause_ms, flow_ml_per_min=args.flow_ml_per_min)
        d.users.start()
    elif not healthy:
        log.error("staying out of service with the valve closed; fix the cause above, then restart")
        if args.sessions:
            runtime.request_stop("out of service")
    try:
        d.run_until_stopped(cfg, args, hooks)
    finally:
        d.stop()
    log.info("stopped; valve %s", "OPEN" if valve.is_open else "closed")
    if report.ledger_error:
        return EXIT_STORAGE
    return EXIT_HARDWARE if hw_error else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args)
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    code = run_command(cfg, args)
    if code is not None:
        return code
    embedded = None
    if args.embedded_cloud:
        if not args.simulate:
            print("error: --embedded-cloud is for the desktop simulation (add --simulate)", file=sys.stderr)
            return EXIT_CONFIG
        try:
            embedded, cfg = start_embedded_cloud(cfg, args)
        except Exception as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
    return run_dispenser(cfg, args, embedded)


if __name__ == "__main__":
    sys.exit(main())
