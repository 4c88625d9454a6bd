"""The model bundle: what export writes, the registry stores and serving loads.

A bundle is a folder::

    manifest.json  feature_spec.json  model.onnx  priors.parquet  members.parquet  artworks.parquet

``manifest.json`` carries the bundle version, feature-spec version, training window,
policy settings, metrics and parity figures, and the sha256 of every other file.
:func:`verify` refuses a bundle whose files are missing, altered or built for another
feature specification; serving never swaps in a bundle that fails it.

``manifest.sig`` signs the manifest's exact bytes with Ed25519 (so, through its sha256
list, every file): :func:`write_manifest` signs with the private key
``bundle_signing_key`` (default ``<home>/keys/bundle-signing.pem``, generated with its
public half ``bundle-signing.pub`` on first use), and serving checks
:func:`verify_signature` against the public key(s) ``serve_bundle_public_key`` before
it trusts anything else in the folder. Serving needs only the public key: whoever can
move ``@champion`` or write the artifact store cannot make serving load a bundle the
daily run did not sign.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyart import feature_spec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from keyart.config import Settings

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
SPEC_FILE = "feature_spec.json"
PRIORS_FILE = "priors.parquet"
MEMBERS_FILE = "members.parquet"
ARTWORKS_FILE = "artworks.parquet"
FILES = (SPEC_FILE, MODEL_FILE, PRIORS_FILE, MEMBERS_FILE, ARTWORKS_FILE)
SIGNATURE_FILE = "manifest.sig"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
SIGNATURE_ALG = "ed25519"
# signed message = context || manifest bytes: a signature made for something else never verifies here
SIGNATURE_CONTEXT = b"keyart-bundle-manifest-v1\n"
KEYS_DIR = "keys"
PRIVATE_KEY_NAME = "bundle-signing.pem"
PUBLIC_KEY_NAME = "bundle-signing.pub"

EXPORT_REFUSED_FILE = "export_refused.json"
"""Written to a run directory (``runs/ds=D``) when ``keyart export`` refuses the day's model
(its ONNX parity failed) and removed by a later export that passes: ``keyart register`` then
registers nothing and ``keyart gate`` keeps the champion with the day's tables, so a model
that cannot be served does not stop the loop (keyart.pipeline, keyart.models.gate)."""
EXIT_EXPORT_REFUSED = 3
"""``keyart export``'s exit status when it refused the model (1: any other failure)."""


def read_export_refusal(run_dir: Path) -> dict[str, Any] | None:
    """The refusal record of a run directory (:data:`EXPORT_REFUSED_FILE`), None without one."""
    path = Path(run_dir) / EXPORT_REFUSED_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_export_refusal(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Write the refusal record of a run directory atomically."""
    tmp = Path(run_dir) / f".{EXPORT_REFUSED_FILE}.tmp"
    tmp.write_text(json.dumps(dict(record), indent=2))
    tmp.replace(Path(run_dir) / EXPORT_REFUSED_FILE)


class BundleError(ValueError):
    """The bundle is missing, corrupt, unsigned, or not for this feature specification.

    ``reason`` is a short machine name (metrics label, log field): ``no_manifest``,
    ``bad_manifest``, ``missing_file``, ``checksum_mismatch``, ``feature_spec``,
    ``unsigned``, ``bad_signature``, ``unknown_key``, ``no_trusted_key``, ...
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    data: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.data["bundle_version"])

    @property
    def feature_spec_version(self) -> str:
        return str(self.data["feature_spec_version"])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def write_manifest(bundle_dir: Path, **fields: Any) -> Manifest:
    """Checksum every bundle file, write manifest.json (call after all files exist) and sign
    it with the settings' bundle signing key (:func:`sign`)."""
    bundle_dir = Path(bundle_dir)
    missing = [f for f in FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir}: cannot write manifest, missing {missing}", "missing_file")
    data = {
        "feature_spec_version": feature_spec.FEATURE_SPEC_VERSION,
        "n_features": feature_spec.N_FEATURES,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        **fields,
        "files": {f: sha256(bundle_dir / f) for f in FILES},
    }
    if "bundle_version" not in data:
        raise BundleError("manifest needs a bundle_version")
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(bundle_dir / MANIFEST)
    sign(bundle_dir)
    return Manifest(data)


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no {MANIFEST}", "no_manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})", "bad_manifest") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or "bundle_version" not in data:
        raise BundleError(f"{path}: lacks bundle_version or files", "bad_manifest")
    return Manifest(data)


def verify(bundle_dir: Path) -> Manifest:
    """Check files, checksums and the feature specification; return the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name in FILES:
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: missing {name}", "missing_file")
        expected = manifest["files"].get(name)
        if expected is None:
            raise BundleError(f"{bundle_dir}: manifest has no checksum for {name}", "bad_manifest")
        if sha256(path) != expected:
            raise BundleError(f"{bundle_dir}: {name} does not match its checksum (corrupt or altered)",
                              "checksum_mismatch")
    if manifest.get("feature_spec_version") != feature_spec.FEATURE_SPEC_VERSION:
        raise BundleError(
            f"{bundle_dir}: built for feature spec {manifest.get('feature_spec_version')}, "
            f"this build speaks {feature_spec.FEATURE_SPEC_VERSION}", "feature_spec"
        )
    try:
        spec = json.loads((bundle_dir / SPEC_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle_dir}: {SPEC_FILE} is not valid JSON ({exc})", "feature_spec") from None
    if not isinstance(spec, dict) or spec.get("features") != list(feature_spec.FEATURE_NAMES):
        raise BundleError(f"{bundle_dir}: {SPEC_FILE} lists other features than this build", "feature_spec")
    return manifest


# --- signatures --------------------------------------------------------------------------

def _settings(settings: Settings | None) -> Settings:
    from keyart.config import settings as default_settings

    return settings or default_settings()


def signing_key_path(settings: Settings | None = None) -> Path:
    """Where the private signing key is: ``bundle_signing_key``, else ``<home>/keys/bundle-signing.pem``."""
    s = _settings(settings)
    return Path(s.bundle_signing_key) if s.bundle_signing_key else s.home / KEYS_DIR / PRIVATE_KEY_NAME


def public_key_path(settings: Settings | None = None) -> Path:
    """Where serving's trusted public key(s) are: ``serve_bundle_public_key``, else
    ``<home>/keys/bundle-signing.pub`` (the public half of the generated default key)."""
    s = _settings(settings)
    return Path(s.serve_bundle_public_key) if s.serve_bundle_public_key else s.home / KEYS_DIR / PUBLIC_KEY_NAME


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def generate_key(private_path: Path, public_path: Path | None = None) -> Ed25519PrivateKey:
    """A new Ed25519 key pair: the private key (PKCS#8 PEM, mode 600) at ``private_path``,
    the public key (PEM) at ``public_path`` (default: beside it, ``.pub``). If another
    process created the private key first, its key is kept and returned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=f".{private_path.name}-", dir=private_path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, private_path)  # fails if it exists: the first key made wins
        except FileExistsError:
            key = load_private_key(private_path)
    finally:
        os.unlink(tmp)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(public_path, _public_pem(key.public_key()), 0o644)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"bundle signing key {path} cannot be read: {exc}", "signing_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"bundle signing key {path} is not an Ed25519 key", "signing_key")
    return key


def signing_key(settings: Settings | None = None) -> Ed25519PrivateKey:
    """The private key bundles are signed with. The default path is generated on first use
    (with its public key beside it); a path set in ``bundle_signing_key`` must exist."""
    s = _settings(settings)
    path = signing_key_path(s)
    if path.is_file():
        key = load_private_key(path)
        if s.bundle_signing_key is None and not path.with_suffix(".pub").is_file():
            _write_atomic(path.with_suffix(".pub"), _public_pem(key.public_key()), 0o644)
        return key
    if s.bundle_signing_key is not None:
        raise BundleError(f"bundle_signing_key {path} does not exist (generate one: openssl genpkey -algorithm "
                          f"ed25519 -out {path})", "signing_key")
    return generate_key(path)


def sign(bundle_dir: Path, key: Ed25519PrivateKey | None = None, settings: Settings | None = None) -> str:
    """Sign ``bundle_dir``'s manifest.json as it is on disk (write ``manifest.sig``); return the key id."""
    bundle_dir = Path(bundle_dir)
    key = key or signing_key(settings)
    message = SIGNATURE_CONTEXT + (bundle_dir / MANIFEST).read_bytes()
    kid = key_id(key.public_key())
    record = {"alg": SIGNATURE_ALG, "key_id": kid,
              "signature": base64.b64encode(key.sign(message)).decode("ascii")}
    tmp = bundle_dir / (SIGNATURE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    tmp.replace(bundle_dir / SIGNATURE_FILE)
    return kid


def load_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 public keys in a PEM file (one or more ``PUBLIC KEY`` blocks), by key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"trusted public key file {path} cannot be read: {exc}", "no_trusted_key") from None
    begin = b"-----BEGIN PUBLIC KEY-----"
    blocks = [begin + b for b in text.split(begin)[1:]]
    keys: dict[str, Ed25519PublicKey] = {}
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise BundleError(f"trusted public key file {path}: a block is not a PEM public key ({exc})",
                              "no_trusted_key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"trusted public key file {path}: not an Ed25519 key", "no_trusted_key")
        keys[key_id(key)] = key
    if not keys:
        raise BundleError(f"trusted public key file {path} holds no PEM public key", "no_trusted_key")
    return keys


def verify_signature(bundle_dir: Path, trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """Check that ``manifest.sig`` signs the manifest's bytes with one of ``trusted`` (by key
    id); return the key id. :class:`BundleError` with reason ``unsigned``, ``bad_signature``
    or ``unknown_key`` otherwise."""
    from cryptography.exceptions import InvalidSignature

    bundle_dir = Path(bundle_dir)
    sig_path = bundle_dir / SIGNATURE_FILE
    try:
        record = json.loads(sig_path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: unsigned (no {SIGNATURE_FILE})", "unsigned") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{sig_path}: unreadable signature ({exc})", "bad_signature") from None
    if not isinstance(record, dict) or record.get("alg") != SIGNATURE_ALG or not isinstance(record.get("signature"), str):
        raise BundleError(f"{sig_path}: not an {SIGNATURE_ALG} signature record", "bad_signature")
    kid = str(record.get("key_id"))
    key = trusted.get(kid)
    if key is None:
        raise BundleError(f"{bundle_dir}: signed by key {kid!r}, which is not trusted here "
                          f"(trusted: {', '.join(sorted(trusted)) or 'none'})", "unknown_key")
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        manifest = (bundle_dir / MANIFEST).read_bytes()
    except (ValueError, OSError) as exc:
        raise BundleError(f"{sig_path}: cannot check ({exc})", "bad_signature") from None
    try:
        key.verify(signature, SIGNATURE_CONTEXT + manifest)
    except InvalidSignature:
        raise BundleError(f"{bundle_dir}: the signature does not verify: {MANIFEST} was altered after signing, "
                          "or signed with another key", "bad_signature") from None
    return kid
