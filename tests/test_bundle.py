"""Release bundles (issue 22): a bundle built by scripts/make-bundle.py from a real checkout is accepted with the
pinned key, and every way of making it lie is refused with its code: another key, a changed manifest, a changed,
added, missing or duplicated file, a link, an unsafe name, another device type, a downgrade, a release that
does not upgrade from the running version, and something that is not a tar at all."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract import bundle as b

ROOT = Path(__file__).resolve().parent.parent


def checkout(tmp: Path, text: str = "print('hello')\n") -> Path:
    """A tiny git checkout with a main.py and the lock files a bundle needs (no packages in them)."""
    src = tmp / "src"
    src.mkdir()
    (src / "main.py").write_text(text)
    (src / "kiosk").mkdir()
    (src / "kiosk" / "__init__.py").write_text("")
    for py in ("311", "313"):
        (src / f"requirements-pi-py{py}.lock").write_text("# nothing\n")
    (src / "untracked.txt").write_text("not in git")
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "main.py", "kiosk", "requirements-pi-py311.lock", "requirements-pi-py313.lock"],
                   cwd=src, check=True)
    return src


@pytest.fixture
def built(tmp_path):
    key = tmp_path / "keys" / "release.pem"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-bundle.py"), "--new-key", str(key)], check=True,
                   capture_output=True)
    src = checkout(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make-bundle.py"), "--key", str(key), "--src",
                          str(src), "--out", str(tmp_path / "dist"), "--version", "0.3.0", "--min-version", "0.2.0",
                          "--host-wheels"], check=True, capture_output=True, text=True)
    path = Path(out.stdout.split()[0])
    pub = b.load_public_key((tmp_path / "keys" / "release.pub.pem").read_bytes())
    return path, pub, b.load_private_key(key.read_bytes())


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def refused(path: Path, pub, code: str) -> str:
    with open(path, "rb") as fh, pytest.raises(b.BundleRefused) as e:
        b.verify_bundle(fh, [pub])
    assert e.value.code == code, e.value.message
    return e.value.message


def resigned(files: dict[str, bytes], key: Ed25519PrivateKey, change) -> dict[str, bytes]:
    """The bundle with its manifest changed by ``change`` and signed again with ``key``."""
    manifest = b.ReleaseManifest.model_validate_json(files["manifest.json"])
    change(manifest)
    return {**files, "manifest.json": b.manifest_bytes(manifest), "manifest.sig": b.sign_manifest(manifest, key)}


def test_a_bundle_of_the_checkout_is_accepted_with_its_key(built):
    path, pub, _ = built
    with open(path, "rb") as fh:
        m = b.verify_bundle(fh, [pub])
    assert (m.version, m.min_version, m.device_types) == ("0.3.0", "0.2.0", [b.DEVICE_TYPE])
    assert set(m.files) == {"app/main.py", "app/kiosk/__init__.py", "app/requirements-pi-py311.lock",
                            "app/requirements-pi-py313.lock"}        # tracked files only; no packages locked
    assert m.files["app/main.py"].sha256 == hashlib.sha256(b"print('hello')\n").hexdigest()
    b.check_applicable(m, b.DEVICE_TYPE, running_version="0.2.0", highest_installed="0.2.0")


def test_what_a_machine_refuses(built, tmp_path):
    path, pub, key = built
    files = members(path)
    other = Ed25519PrivateKey.generate()
    refused(path, b.load_public_key(other.public_key().public_bytes(
        b.serialization.Encoding.PEM, b.serialization.PublicFormat.SubjectPublicKeyInfo)), "unknown_key")
    # signed by someone else who claims our key id
    forged = json.loads(files["manifest.sig"])
    forged["signature"] = json.loads(b.sign_manifest(b.ReleaseManifest.model_validate_json(files["manifest.json"]),
                                                     other))["signature"]
    refused(write(tmp_path / "f.bundle", {**files, "manifest.sig": json.dumps(forged).encode()}), pub,
            "bad_signature")
    # the manifest changed after signing
    changed = files["manifest.json"].replace(b'"0.3.0"', b'"9.9.9"')
    refused(write(tmp_path / "m.bundle", {**files, "manifest.json": changed}), pub, "bad_signature")
    # a file changed, added, missing, duplicated, or a link
    assert "sha256 differs" in refused(write(tmp_path / "t.bundle", {**files, "app/main.py": b"print('EVIL!')\n"}),
                                       pub, "tampered")
    assert "not in its manifest" in refused(write(tmp_path / "a.bundle", {**files, "app/extra.py": b"x"}), pub,
                                            "tampered")
    refused(write(tmp_path / "d.bundle", {k: v for k, v in files.items() if k != "app/main.py"}), pub, "tampered")
    with tarfile.open(tmp_path / "dup.bundle", "w") as tar:
        for name, data in [*files.items(), ("app/main.py", files["app/main.py"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refused(tmp_path / "dup.bundle", pub, "tampered")
    linked = resigned(files, key, lambda m: None)
    del linked["app/main.py"]
    refused(write(tmp_path / "l.bundle", linked, links={"app/main.py": "/etc/shadow"}), pub, "tampered")
    # a name that would land outside the release, even when signed
    with pytest.raises(b.BundleRefused) as e:
        b.verify_manifest(*(lambda f: (f["manifest.json"], f["manifest.sig"]))(resigned(
            files, key, lambda m: m.files.__setitem__("app/../../etc/cron.d/x", m.files["app/main.py"]))), [pub])
    assert e.value.code == "malformed" and "unsafe file name" in e.value.message
    refused(write(tmp_path / "n.bundle", {"x": b"y"}), pub, "malformed")
    (tmp_path / "junk.bundle").write_bytes(b"\x00" * 10 + b"not a tar")
    refused(tmp_path / "junk.bundle", pub, "malformed")


def test_which_machines_may_install_a_release(built):
    path, pub, _ = built
    with open(path, "rb") as fh:
        m = b.verify_bundle(fh, [pub])
    for device, running, highest, code in (("tapshare-esp32", "0.2.0", "0.2.0", "wrong_device_type"),
                                           (b.DEVICE_TYPE, "0.2.0", "0.3.0", "downgrade"),
                                           (b.DEVICE_TYPE, "0.2.0", "0.10.0", "downgrade"),   # numeric, not text
                                           (b.DEVICE_TYPE, "0.1.9", "0.1.9", "too_old")):
        with pytest.raises(b.BundleRefused) as e:
            b.check_applicable(m, device, running, highest)
        assert e.value.code == code
    b.check_applicable(m, b.DEVICE_TYPE, "0.2.5", "0.2.10")
