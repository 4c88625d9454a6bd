"""The model bundle: what export writes, the registry stores and serving loads.

A bundle is a folder::

    manifest.json  feature_spec.json  model.onnx  priors.parquet  members.parquet  artworks.parquet

``manifest.json`` carries the bundle version, feature-spec version, training window,
policy settings, metrics and parity figures, and the sha256 of every other file.
:func:`verify` refuses a bundle whose files are missing, altered or built for another
feature specification; serving never swaps in a bundle that fails it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyart import feature_spec

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
SPEC_FILE = "feature_spec.json"
PRIORS_FILE = "priors.parquet"
MEMBERS_FILE = "members.parquet"
ARTWORKS_FILE = "artworks.parquet"
FILES = (SPEC_FILE, MODEL_FILE, PRIORS_FILE, MEMBERS_FILE, ARTWORKS_FILE)
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"


class BundleError(ValueError):
    """The bundle is missing, corrupt, or not for this feature specification."""


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
    """Checksum every bundle file and write manifest.json (call after all files exist)."""
    bundle_dir = Path(bundle_dir)
    missing = [f for f in FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir}: cannot write manifest, missing {missing}")
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
    return Manifest(data)


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "files" not in data or "bundle_version" not in data:
        raise BundleError(f"{path}: lacks bundle_version or files")
    return Manifest(data)


def verify(bundle_dir: Path) -> Manifest:
    """Check files, checksums and the feature specification; return the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name in FILES:
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: missing {name}")
        expected = manifest["files"].get(name)
        if expected is None:
            raise BundleError(f"{bundle_dir}: manifest has no checksum for {name}")
        if sha256(path) != expected:
            raise BundleError(f"{bundle_dir}: {name} does not match its checksum (corrupt or altered)")
    if manifest.feature_spec_version != feature_spec.FEATURE_SPEC_VERSION:
        raise BundleError(
            f"{bundle_dir}: built for feature spec {manifest.feature_spec_version}, "
            f"this build speaks {feature_spec.FEATURE_SPEC_VERSION}"
        )
    spec = json.loads((bundle_dir / SPEC_FILE).read_text())
    if spec.get("features") != list(feature_spec.FEATURE_NAMES):
        raise BundleError(f"{bundle_dir}: {SPEC_FILE} lists other features than this build")
    return manifest
