#!/usr/bin/env python3
"""Build a signed release bundle for fleet updates from this checkout (see contract/bundle.py for the format).

    .venv/bin/python scripts/make-bundle.py --new-key keys/release.pem     # once: the signing key (keep it
                                                                            # offline) and keys/release.pub.pem
    .venv/bin/python scripts/make-bundle.py --key keys/release.pem --out dist/ [--version 0.3.0]
        [--min-version 0.2.0] [--notes "..."] [--python 3.11 --python 3.13] [--host-wheels]

The bundle holds the checkout's tracked files (``git ls-files``, as deploy.sh installs them) under ``app/`` and,
for each ``--python``, the wheels of ``requirements-pi-py3XX.lock`` for a Raspberry Pi (aarch64 Linux) under
``wheels/py3XX/``, downloaded by pip with the lock's hashes, so a machine installs offline from the bundle.
``--host-wheels`` downloads them for this computer instead (tests and simulated machines). The public key goes
onto each machine with ``deploy.sh`` (``/etc/tapshare/release-keys/``), where updates cannot change it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from contract import SOFTWARE_VERSION  # noqa: E402
from contract import bundle as b  # noqa: E402

PI_PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64", "linux_aarch64")


def new_key(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    pub = path.with_name(path.name.removesuffix(".pem") + ".pub.pem")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"signing key {path} (keep it offline), public key {pub} (key id {b.key_id(key.public_key())})")


def tracked_files(src: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True, check=True).stdout
    return sorted(name for name in out.decode().split("\0") if name and (src / name).is_file())


def download_wheels(src: Path, python: str, dest: Path, host: bool) -> None:
    lock = src / f"requirements-pi-py{python.replace('.', '')}.lock"
    if not lock.is_file():
        raise SystemExit(f"error: no {lock.name} (scripts/lock-pi.sh makes it)")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--require-hashes", "-r", str(lock), "-d", str(dest), "--only-binary=:all:"]
    if not host:
        cmd += ["--python-version", python, "--implementation", "cp"]
        for plat in PI_PLATFORMS:
            cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)


def build(src: Path, key_path: Path, out_dir: Path, version: str, min_version: str, pythons: list[str],
          host_wheels: bool, notes: str = "") -> Path:
    key = b.load_private_key(key_path.read_bytes())
    files: dict[str, Path] = {f"app/{name}": src / name for name in tracked_files(src)}
    with tempfile.TemporaryDirectory() as tmp:
        for py in pythons:
            tag = "py" + py.replace(".", "")
            dest = Path(tmp) / tag
            download_wheels(src, py, dest, host_wheels)
            for wheel in sorted(dest.iterdir()):
                files[f"wheels/{tag}/{wheel.name}"] = wheel
        entries = {}
        for name, path in files.items():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            entries[name] = b.FileEntry(sha256=h.hexdigest(), size=path.stat().st_size)
        manifest = b.ReleaseManifest(format=b.BUNDLE_FORMAT, version=version, min_version=min_version,
                                     device_types=[b.DEVICE_TYPE], created_ms=time.time_ns() // 1_000_000,
                                     notes=notes, files=entries)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"tapshare-{version}.bundle"
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (("manifest.json", b.manifest_bytes(manifest)),
                               ("manifest.sig", b.sign_manifest(manifest, key))):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, manifest.created_ms // 1000
                tar.addfile(info, io.BytesIO(data))
            for name, path in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, manifest.created_ms // 1000
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-key", type=Path, help="write a new Ed25519 signing key here (and its .pub.pem)")
    ap.add_argument("--key", type=Path, help="the signing key (PEM)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--src", type=Path, default=ROOT, help="the checkout to bundle")
    ap.add_argument("--version", default=SOFTWARE_VERSION)
    ap.add_argument("--min-version", default="0.0.0")
    ap.add_argument("--notes", default="")
    ap.add_argument("--python", action="append", help="3.11 and 3.13 unless given")
    ap.add_argument("--host-wheels", action="store_true",
                    help=f"wheels for this computer ({platform.machine()}, Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}) instead of a Pi's")
    args = ap.parse_args(argv)
    if args.new_key:
        new_key(args.new_key)
        return 0
    if not args.key:
        ap.error("--key is needed (make one with --new-key)")
    try:
        b.parse_version(args.version)
        b.parse_version(args.min_version)
    except b.BundleRefused as e:
        ap.error(e.message)
    this_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    pythons = args.python or ([this_python] if args.host_wheels else ["3.11", "3.13"])
    t0 = time.monotonic()
    out = build(args.src.resolve(), args.key, args.out, args.version, args.min_version, pythons, args.host_wheels,
                args.notes)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB, {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
