"""The MLflow registry of keyart bundles: versions, aliases, champion history, downloads.

Every daily bundle is one version of the registered model ``settings.registered_model``
(``keyart-artwork``), logged with the ``mlflow.onnx`` flavor (signature and input example)
*and* with every bundle file copied byte for byte into the model directory. So

    mlflow.artifacts.download_artifacts("models:/keyart-artwork@champion")

yields a folder that :func:`keyart.bundle.verify` accepts: serving needs nothing else.
``model.onnx`` is the exported file itself, never a re-serialisation, so its checksum
in ``manifest.json`` holds.

Aliases: ``challenger`` is the newest registered candidate, ``champion`` the version
serving loads. The registered model's tag ``keyart.champion_history`` lists the champion
versions, oldest first; :func:`rollback` restores the newest entry before the current one.
Every promotion and rollback is also written as tags on the versions concerned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from keyart import bundle, feature_spec
from keyart.config import Settings
from keyart.config import settings as default_settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME_IN_RUN = "bundle"  # name of the logged model inside a run
HISTORY_TAG = "keyart.champion_history"
HISTORY_KEEP = 200

# Version tags (lineage and status).
TAG_DS = "keyart.ds"
TAG_SHA = "keyart.bundle_sha256"
TAG_STATUS = "keyart.status"


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, no previous champion, ...)."""


# ---------------------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------------------

def configure(settings: Settings | None = None) -> Settings:
    """Point MLflow (tracking and registry) at ``settings.tracking_uri``; return the settings."""
    settings = settings or default_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if str(db) != ":memory:":
            db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return settings


def client(settings: Settings | None = None) -> MlflowClient:
    settings = configure(settings)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def artifact_location(settings: Settings) -> str:
    """The experiment's artifact location as a URI (a plain path becomes file://)."""
    root = settings.artifact_root
    if urlparse(root).scheme in ("", "file") and not root.startswith("file:"):
        path = Path(root).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return root


def ensure_experiment(settings: Settings | None = None) -> str:
    """Id of ``settings.mlflow_experiment``, created with ``artifact_root`` when new."""
    settings = configure(settings)
    exp = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(settings.mlflow_experiment,
                                        artifact_location=artifact_location(settings))
    except MlflowException:  # created concurrently
        exp = mlflow.get_experiment_by_name(settings.mlflow_experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------
# Logging a bundle as an mlflow.onnx model
# ---------------------------------------------------------------------------------------

def bundle_checksum(bundle_dir: Path) -> str:
    """Identity of a bundle: sha256 over the checksums of its files (model, priors, members,
    artworks, spec). The manifest's own bytes are left out on purpose: they carry the export
    time, and re-exporting the same day (a retry, a backfill) must not look like a new model."""
    files = bundle.read_manifest(Path(bundle_dir))["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_spec.N_FEATURES), bundle.INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2), bundle.OUTPUT_NAME)]),
    )


def input_example(n: int = 2) -> dict[str, np.ndarray]:
    """A valid model input: ``n`` rows of zeros (every feature is defined at 0)."""
    return {bundle.INPUT_NAME: np.zeros((n, feature_spec.N_FEATURES), dtype=np.float32)}


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("onnx", "onnxruntime"):
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


class _BundleFlavor:
    """mlflow.onnx flavor plus the bundle files, copied unchanged into the model folder."""

    __name__ = "mlflow.onnx"

    @staticmethod
    def save_model(path: str, mlflow_model: Model, bundle_dir: Path, **kwargs: Any) -> None:
        import mlflow.onnx
        import onnx

        onnx_model = onnx.load(str(Path(bundle_dir) / bundle.MODEL_FILE))
        mlflow.onnx.save_model(onnx_model, path, mlflow_model=mlflow_model,
                               save_as_external_data=False, **kwargs)
        for name in (*bundle.FILES, bundle.MANIFEST):
            # model.onnx too: the exported bytes, exactly what the manifest checksums.
            shutil.copyfile(Path(bundle_dir) / name, Path(path) / name)
        bundle.verify(Path(path))  # what serving will download must verify before it is uploaded
        mlflow_model.model_size_bytes = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_bundle_model(bundle_dir: Path, run_id: str, model_tags: Mapping[str, str] | None = None) -> str:
    """Log ``bundle_dir`` as an mlflow.onnx model of ``run_id``; return its ``models:/`` URI."""
    bundle.verify(bundle_dir)
    info = Model.log(
        artifact_path=None, name=MODEL_NAME_IN_RUN, flavor=_BundleFlavor, flavor_name="mlflow.onnx", run_id=run_id,
        bundle_dir=Path(bundle_dir), signature=signature(), input_example=input_example(),
        pip_requirements=_pip_requirements(), tags=dict(model_tags or {}),
        metadata={"bundle_version": bundle.read_manifest(bundle_dir).version},
    )
    return info.model_uri


def register_version(model_uri: str, tags: Mapping[str, str], settings: Settings | None = None) -> ModelVersion:
    """Register ``model_uri`` as a new version of the registered model, with ``tags``."""
    settings = configure(settings)
    return mlflow.register_model(model_uri, settings.registered_model,
                                 tags={k: str(v) for k, v in tags.items()})


# ---------------------------------------------------------------------------------------
# Looking versions up
# ---------------------------------------------------------------------------------------

def versions(settings: Settings | None = None) -> list[ModelVersion]:
    """Every version of the registered model, newest first (empty when it does not exist)."""
    settings = settings or default_settings()
    found = client(settings).search_model_versions(f"name = '{settings.registered_model}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def versions_for_ds(ds: str, settings: Settings | None = None) -> list[ModelVersion]:
    """Versions registered for partition ``ds``, newest first."""
    return [v for v in versions(settings) if v.tags.get(TAG_DS) == ds]


def find_version(ds: str, checksum: str, settings: Settings | None = None) -> ModelVersion | None:
    """The version registered for ``ds`` with this bundle checksum, if any."""
    return next((v for v in versions_for_ds(ds, settings) if v.tags.get(TAG_SHA) == checksum), None)


def get_version(version: str | int, settings: Settings | None = None) -> ModelVersion:
    settings = settings or default_settings()
    try:
        return client(settings).get_model_version(settings.registered_model, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{settings.registered_model} has no version {version}: {exc.message}") from None


def get_alias_version(alias: str, settings: Settings | None = None) -> str | None:
    """The version number behind ``alias``, or None (no alias or no registered model)."""
    settings = settings or default_settings()
    try:
        return str(client(settings).get_model_version_by_alias(settings.registered_model, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def get_champion_version(settings: Settings | None = None) -> str | None:
    """The champion's version number, or None when there is no champion yet."""
    return get_alias_version(CHAMPION, settings)


def get_challenger_version(settings: Settings | None = None) -> str | None:
    return get_alias_version(CHALLENGER, settings)


# ---------------------------------------------------------------------------------------
# Champion changes
# ---------------------------------------------------------------------------------------

def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def champion_history(settings: Settings | None = None) -> list[str]:
    """Champion versions, oldest first (the last is normally the current champion)."""
    settings = settings or default_settings()
    try:
        rm = client(settings).get_registered_model(settings.registered_model)
    except MlflowException:
        return []
    raw = rm.tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _save_history(history: list[str], settings: Settings) -> None:
    client(settings).set_registered_model_tag(settings.registered_model, HISTORY_TAG,
                                              json.dumps(history[-HISTORY_KEEP:]))


def tag_version(version: str, tags: Mapping[str, Any], settings: Settings | None = None) -> None:
    settings = settings or default_settings()
    c = client(settings)
    for key, value in tags.items():
        c.set_model_version_tag(settings.registered_model, str(version), key, str(value))


def set_challenger(version: str, settings: Settings | None = None) -> None:
    settings = settings or default_settings()
    client(settings).set_registered_model_alias(settings.registered_model, CHALLENGER, str(version))


def promote(version: str | int, reason: str, actor: str, settings: Settings | None = None) -> str | None:
    """Make ``version`` the champion; record who and why. Returns the previous champion."""
    settings = settings or default_settings()
    version = str(get_version(version, settings).version)
    previous = get_champion_version(settings)
    if previous == version:
        return previous
    client(settings).set_registered_model_alias(settings.registered_model, CHAMPION, version)
    history = champion_history(settings)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved outside keyart: keep it restorable
    _save_history([*history, version], settings)
    tag_version(version, {"keyart.promoted_at": _now(), "keyart.promoted_by": actor,
                          "keyart.promotion_reason": reason,
                          "keyart.replaced_champion": previous or "none"}, settings)
    if previous is not None:
        tag_version(previous, {"keyart.demoted_at": _now(), "keyart.demoted_for": version}, settings)
    log.info("champion: %s -> %s (%s: %s)", previous, version, actor, reason)
    return previous


def rollback(reason: str, actor: str, settings: Settings | None = None) -> tuple[str, str]:
    """Restore the champion before the current one; return (rolled back, restored)."""
    settings = settings or default_settings()
    current = get_champion_version(settings)
    if current is None:
        raise RegistryError("there is no champion to roll back")
    history = champion_history(settings)
    existing = {str(v.version) for v in versions(settings)}
    idx = next((i for i in range(len(history) - 1, -1, -1)
                if history[i] != current and history[i] in existing), None)
    if idx is None:
        raise RegistryError(f"version {current} is the only champion on record; nothing to roll back to")
    target = history[idx]
    client(settings).set_registered_model_alias(settings.registered_model, CHAMPION, target)
    _save_history(history[: idx + 1], settings)
    tag_version(current, {"keyart.rolled_back_at": _now(), "keyart.rolled_back_by": actor,
                          "keyart.rollback_reason": reason}, settings)
    tag_version(target, {"keyart.restored_at": _now(), "keyart.restored_by": actor,
                         "keyart.restore_reason": reason}, settings)
    log.info("champion rolled back: %s -> %s (%s: %s)", current, target, actor, reason)
    return current, target


# ---------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------

def bundle_cache_dir(settings: Settings) -> Path:
    return settings.home / "cache" / "bundles"


def download_bundle(version: str | int, settings: Settings | None = None,
                    cache_dir: Path | None = None) -> Path:
    """Download version ``version`` to ``<cache>/v<version>/`` (once), verify it, return the path."""
    settings = configure(settings)
    cache = Path(cache_dir) if cache_dir else bundle_cache_dir(settings)
    target = cache / f"v{version}"
    if target.is_dir():
        try:
            bundle.verify(target)
            return target
        except bundle.BundleError:
            log.warning("cached bundle %s is damaged; downloading again", target)
            shutil.rmtree(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=cache))
    try:
        uri = f"models:/{settings.registered_model}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        bundle.verify(local)
        try:
            local.rename(target)
        except OSError:  # another process won the race
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def champion_bundle_path(settings: Settings | None = None) -> Path | None:
    """The champion's bundle as a verified local folder, or None when there is no champion."""
    settings = settings or default_settings()
    version = get_champion_version(settings)
    return None if version is None else download_bundle(version, settings)
