"""Release bundles for fleet updates: what one is, how it is signed, and how a machine (and the cloud, when an
operator uploads one) checks it before trusting a byte of it.

A bundle is one uncompressed tar file:

* ``manifest.json``: the release (version, the lowest version it upgrades from, the device types it is for,
  when it was made) and the sha256 and size of every other file in the bundle, as canonical JSON (sorted keys,
  no spaces): these exact bytes are signed;
* ``manifest.sig``: the Ed25519 signature of ``manifest.json``, base64, with the signing key's id;
* ``app/…``: the application's files (the tracked files of the checkout it was built from);
* ``wheels/<python>/…``: the wheelhouse each Python installs from offline (``--no-index --require-hashes``
  with the lock file under ``app/``).

A machine accepts a bundle only if the signature is by a key it has pinned, every file is listed with its
hash, nothing else is in it, every name is a plain relative path of a regular file, the machine's type is one
of the bundle's, and the version is above every version the machine ever installed (anti-rollback) and at
least the bundle's ``min_version`` below it. Each refusal has a code and words.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tarfile
from typing import IO, Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["BUNDLE_FORMAT", "DEVICE_TYPE", "MAX_BUNDLE_BYTES", "BundleRefused", "FileEntry", "ReleaseManifest",
           "check_applicable", "key_id", "load_private_key", "load_public_key", "manifest_bytes", "parse_version",
           "sign_manifest", "verify_bundle", "verify_manifest"]

BUNDLE_FORMAT = 1
DEVICE_TYPE = "tapshare-pi"                  # the dispenser on a Raspberry Pi (the only type so far)
MAX_BUNDLE_BYTES = 400 * 1024 * 1024         # the application plus two wheelhouses is about 120 MB
MAX_FILES = 20_000
VERSION_RE = re.compile(r"^\d{1,6}(?:\.\d{1,6}){1,3}$")
_SAFE_PATH = re.compile(r"^(?:app|wheels)/(?:[A-Za-z0-9_.+@=-]+/)*[A-Za-z0-9_.+@=-]+$")


class BundleRefused(ValueError):
    """A bundle not to be installed: ``code`` (stable, reported to the cloud) and words for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0, le=MAX_BUNDLE_BYTES)]


class ReleaseManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: int
    version: Annotated[str, Field(pattern=VERSION_RE.pattern)]
    min_version: Annotated[str, Field(pattern=VERSION_RE.pattern)]     # the oldest version it upgrades
    device_types: Annotated[list[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,40}$")]], Field(min_length=1)]
    created_ms: Annotated[int, Field(ge=0)]
    notes: Annotated[str, Field(max_length=2000)] = ""
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        if not files or len(files) > MAX_FILES:
            raise ValueError(f"a bundle lists 1 to {MAX_FILES} files")
        for name in files:
            if not _SAFE_PATH.fullmatch(name) or "/../" in f"/{name}/" or "/./" in f"/{name}/":
                raise ValueError(f"unsafe file name {name[:100]!r}")
        return files

    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def parse_version(text: str) -> tuple[int, ...]:
    if not VERSION_RE.fullmatch(text or ""):
        raise BundleRefused("malformed", f"not a version: {text[:30]!r}")
    return tuple(int(x) for x in text.split("."))


def manifest_bytes(manifest: ReleaseManifest) -> bytes:
    """The canonical bytes of a manifest: what is signed."""
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleRefused("bad_key", "the signing key must be an Ed25519 private key (PEM)")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise BundleRefused("bad_key", f"not a public key in PEM: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise BundleRefused("bad_key", "the release key must be an Ed25519 public key (PEM)")
    return key


def sign_manifest(manifest: ReleaseManifest, private_key: Ed25519PrivateKey) -> bytes:
    """``manifest.sig``: the key's id and the signature of the canonical manifest, as JSON."""
    sig = private_key.sign(manifest_bytes(manifest))
    return json.dumps({"key_id": key_id(private_key.public_key()),
                       "signature": base64.b64encode(sig).decode()}).encode()


def verify_manifest(raw_manifest: bytes, raw_sig: bytes, public_keys: list[Ed25519PublicKey]) -> ReleaseManifest:
    """The manifest, if ``raw_sig`` is a signature of exactly these bytes by one of ``public_keys``."""
    try:
        sig = json.loads(raw_sig)
        signature = base64.b64decode(sig["signature"], validate=True)
        kid = str(sig["key_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise BundleRefused("bad_signature", "manifest.sig is not a signature file") from e
    keys = [k for k in public_keys if key_id(k) == kid]
    if not keys:
        raise BundleRefused("unknown_key", f"signed with key {kid[:16]}, which this machine does not trust")
    try:
        keys[0].verify(signature, raw_manifest)
    except InvalidSignature as e:
        raise BundleRefused("bad_signature", "the manifest's signature does not match: the bundle is not "
                                             "as it was signed") from e
    try:
        manifest = ReleaseManifest.model_validate_json(raw_manifest)
    except ValidationError as e:
        raise BundleRefused("malformed", f"the manifest is malformed: {e.errors()[0]['msg']}") from e
    if manifest.format != BUNDLE_FORMAT:
        raise BundleRefused("unsupported_format", f"bundle format {manifest.format}; this software reads "
                                                  f"{BUNDLE_FORMAT}")
    if manifest_bytes(manifest) != raw_manifest:
        raise BundleRefused("malformed", "the manifest is not in canonical form")
    return manifest


def verify_bundle(fileobj: IO[bytes], public_keys: list[Ed25519PublicKey]) -> ReleaseManifest:
    """Check a whole bundle (a seekable file): signature, then every member against the manifest (hash, size,
    regular file, nothing unlisted, nothing missing). Reads each file once; holds none in memory."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_FILES + 2:
                raise BundleRefused("malformed", "too many files in the bundle")
            by_name = {}
            for m in members:
                if m.name in by_name:
                    raise BundleRefused("tampered", f"{m.name[:100]} is in the bundle twice")
                by_name[m.name] = m
            raw_manifest, raw_sig = (_read_small(tar, by_name, n) for n in ("manifest.json", "manifest.sig"))
            manifest = verify_manifest(raw_manifest, raw_sig, public_keys)
            extra = set(by_name) - set(manifest.files) - {"manifest.json", "manifest.sig"}
            if extra:
                raise BundleRefused("tampered", f"{sorted(extra)[0][:100]} is in the bundle but not in its manifest")
            for name, entry in manifest.files.items():
                m = by_name.get(name)
                if m is None:
                    raise BundleRefused("tampered", f"{name[:100]} is missing from the bundle")
                if not m.isreg():
                    raise BundleRefused("tampered", f"{name[:100]} is not a regular file")
                if m.size != entry.size:
                    raise BundleRefused("tampered", f"{name[:100]} has {m.size} bytes, the manifest says {entry.size}")
                h = hashlib.sha256()
                fh = tar.extractfile(m)
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                if h.hexdigest() != entry.sha256:
                    raise BundleRefused("tampered", f"{name[:100]} is not the file that was signed (sha256 differs)")
    except tarfile.TarError as e:
        raise BundleRefused("malformed", f"not a bundle (tar): {e}") from e
    return manifest


def _read_small(tar: tarfile.TarFile, by_name: dict, name: str, limit: int = 4 * 1024 * 1024) -> bytes:
    m = by_name.get(name)
    if m is None or not m.isreg() or m.size > limit:
        raise BundleRefused("malformed", f"the bundle has no {name}")
    return tar.extractfile(m).read()


def check_applicable(manifest: ReleaseManifest, device_type: str, running_version: str,
                     highest_installed: str) -> None:
    """Whether this machine may install the release: its type, anti-rollback (never at or below the highest
    version it ever installed) and the release's lowest version to upgrade from."""
    if device_type not in manifest.device_types:
        raise BundleRefused("wrong_device_type", f"release {manifest.version} is for "
                                                 f"{', '.join(manifest.device_types)}, not {device_type}")
    version = parse_version(manifest.version)
    if version <= parse_version(highest_installed):
        raise BundleRefused("downgrade", f"release {manifest.version} is not newer than {highest_installed}, "
                                         "the highest version this machine has installed")
    if parse_version(running_version) < parse_version(manifest.min_version):
        raise BundleRefused("too_old", f"release {manifest.version} upgrades from {manifest.min_version} or "
                                       f"later; this machine runs {running_version}")
