"""The MLflow registry of keyart bundles: versions, aliases, champion history, and the one
way a model URI becomes a local bundle folder.

Every daily bundle is one version of the registered model ``settings.registered_model``
(``keyart-artwork``), logged with the ``mlflow.onnx`` flavor (signature and input example)
*and* with every bundle file copied byte for byte into the model directory. So

    mlflow.artifacts.download_artifacts("models:/keyart-artwork@champion")

yields a folder that :func:`keyart.bundle.verify` accepts: serving needs nothing else.
``model.onnx`` is the exported file itself, never a re-serialisation, so its checksum
in ``manifest.json`` holds, and ``manifest.sig`` travels with the manifest, so serving
can check that the daily run signed what the registry hands out.

Aliases: ``challenger`` is the newest registered candidate, ``champion`` the version
serving loads. The registered model's tag ``keyart.champion_history`` lists the champion
versions, oldest first; :func:`rollback` restores the newest earlier entry that serves
another model. Every promotion and rollback is also written as tags on the versions concerned.

Versions are of two kinds (tag ``keyart.kind``): ``trained`` (a day's training run; versions
without the tag are trained) and ``table_refresh`` (the champion's unchanged model.onnx with
a later day's priors, member snapshot and catalog, registered by the gate when it keeps the
champion). A refresh names the trained version its model comes from (``keyart.model_from``),
so "which model serves" (:func:`model_identity`, the model file's sha256) and "which day's
tables serve" (``keyart.tables_ds``) are both answered from the version's tags.

Model URIs (:func:`resolve`, :func:`fetch`, :func:`bundle_path`) are a bundle folder,
``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``models:/<name>`` (its
champion). Serving's hot swap and offline evaluation's champion both go through them, so
both see the same version and share one download cache, ``<home>/cache/bundles/<name>-v<version>``:
a version is downloaded to a temporary folder, verified and only then renamed into place,
and a cached copy that no longer verifies, or is not the bundle the version records
(``keyart.bundle_sha256``: a registry created again under the same home numbers from 1
again), is downloaded again.

MLflow is imported on first use, not with this module: serving imports it to resolve its
model URI, and importing MLflow drags in pandas and pyspark, which a server loading a
bundle folder must not pay for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from keyart import bundle, feature_spec
from keyart.config import Settings
from keyart.config import settings as default_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import Model, ModelSignature

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODELS_SCHEME = "models:/"
MODEL_NAME_IN_RUN = "bundle"  # name of the logged model inside a run
HISTORY_TAG = "keyart.champion_history"
HISTORY_KEEP = 200

# Version tags (lineage and status).
TAG_DS = "keyart.ds"
TAG_SHA = "keyart.bundle_sha256"
TAG_STATUS = "keyart.status"
TAG_BUNDLE_VERSION = "keyart.bundle_version"
TAG_KIND = "keyart.kind"
TAG_MODEL_SHA = "keyart.model_sha256"  # sha256 of model.onnx: the model's identity
TAG_MODEL_FROM = "keyart.model_from"  # refresh: the trained version its model comes from
TAG_MODEL_DS = "keyart.model_ds"  # refresh: the ds that model was trained for
TAG_TABLES_DS = "keyart.tables_ds"  # the day of the priors / members / catalog the bundle carries
KIND_TRAINED = "trained"
KIND_REFRESH = "table_refresh"

# What MLflow answers for a registered model or alias that does not exist.
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class RegistryError(RuntimeError):
    """A registry operation cannot be done (unknown version, no previous champion, ...)."""


# ---------------------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------------------

def configure(settings: Settings | None = None) -> Settings:
    """Point MLflow (tracking and registry) at ``settings.tracking_uri``, and its
    ``keyart-artifacts:`` locations at the settings' artifact root; return the settings."""
    import mlflow

    from keyart import mlflow_store

    settings = settings or default_settings()
    mlflow_store.use_root(mlflow_store.local_root(settings))
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if str(db) != ":memory:":
            db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _pin_default_artifact_root(settings)
    return settings


_pinned_root: str | None = None


def _pin_default_artifact_root(settings: Settings) -> None:
    """Give MLflow's SQL tracking store keyart's artifact root as its default. A client
    otherwise opens the store with ``./mlruns``: it creates that folder in whatever directory
    the process runs in (an empty ``mlruns/`` in a checkout, a task's temporary folder) and
    gives a fresh database's "Default" experiment that location. MLflow has no setting for
    this on the client side, so the store builder of the SQL schemes is replaced (private
    API of mlflow.tracking; checked by tests/integration/test_mlflow_review.py)."""
    global _pinned_root
    if urlparse(settings.tracking_uri).scheme in ("http", "https", "databricks"):
        return
    root = artifact_location(settings)
    if root == _pinned_root:
        return
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.tracking._tracking_service import utils as tracking_utils

    def builder(store_uri: str, artifact_uri: str | None = None) -> Any:
        return tracking_utils._get_sqlalchemy_store(store_uri, artifact_uri or root)

    for scheme in DATABASE_ENGINES:
        tracking_utils._register(scheme, builder)
    tracking_utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    _pinned_root = root


def registry_exists(settings: Settings) -> bool:
    """False while the registry is a SQLite file not created yet: there is nothing to read
    then, and opening it would create an empty registry as a side effect of a lookup."""
    uri = settings.tracking_uri
    if not uri.startswith("sqlite:///"):
        return True
    db = uri[len("sqlite:///"):]
    return db == ":memory:" or Path(db).exists()


def client(settings: Settings | None = None) -> MlflowClient:
    from mlflow import MlflowClient

    settings = configure(settings)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def artifact_location(settings: Settings) -> str:
    """The artifact location keyart gives an experiment it creates. A local artifact root
    (a path or ``file:``) becomes ``keyart-artifacts:/``, which MLflow records as it is and
    :mod:`keyart.mlflow_store` resolves against the artifact root whenever it is read or
    written, so the store keeps working when the home moves; any other root (``s3://…``,
    ``mlflow-artifacts:/…``) is used as it is."""
    from keyart import mlflow_store

    if mlflow_store.is_local(settings):
        mlflow_store.local_root(settings).mkdir(parents=True, exist_ok=True)
        return mlflow_store.ROOT_URI
    return settings.artifact_root


def ensure_experiment(settings: Settings | None = None) -> str:
    """Id of ``settings.mlflow_experiment``, created with :func:`artifact_location` when new.
    An existing experiment keeps the location it was created with (an absolute ``file://``
    one of a store made before locations were relative goes on working where it is)."""
    import mlflow
    from mlflow.exceptions import MlflowException

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
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

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
        signed = (Path(bundle_dir) / bundle.SIGNATURE_FILE).is_file()
        for name in (*bundle.FILES, bundle.MANIFEST, *((bundle.SIGNATURE_FILE,) if signed else ())):
            # model.onnx too: the exported bytes, exactly what the manifest checksums and
            # manifest.sig signs (serving refuses a version whose signature does not verify).
            shutil.copyfile(Path(bundle_dir) / name, Path(path) / name)
        bundle.verify(Path(path))  # what serving will download must verify before it is uploaded
        mlflow_model.model_size_bytes = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_bundle_model(bundle_dir: Path, run_id: str, model_tags: Mapping[str, str] | None = None) -> str:
    """Log ``bundle_dir`` as an mlflow.onnx model of ``run_id``; return its ``models:/`` URI."""
    from mlflow.models import Model

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
    import mlflow

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


def version_kind(tags: Mapping[str, str]) -> str:
    """``trained`` or ``table_refresh`` (versions registered before kinds existed are trained)."""
    return tags.get(TAG_KIND) or KIND_TRAINED


def versions_for_ds(ds: str, settings: Settings | None = None, kind: str | None = KIND_TRAINED) -> list[ModelVersion]:
    """Versions registered for partition ``ds``, newest first: the day's trained versions by
    default, its table refreshes with ``kind=KIND_REFRESH``, every version with ``kind=None``."""
    return [v for v in versions(settings)
            if v.tags.get(TAG_DS) == ds and (kind is None or version_kind(v.tags) == kind)]


def find_version(ds: str, checksum: str, settings: Settings | None = None) -> ModelVersion | None:
    """The trained version registered for ``ds`` with this bundle checksum, if any."""
    return next((v for v in versions_for_ds(ds, settings) if v.tags.get(TAG_SHA) == checksum), None)


def model_identity(tags: Mapping[str, str]) -> str | None:
    """What identifies a version's model: the sha256 of its model.onnx (the same for a trained
    version and every table refresh of it), else its bundle version (versions registered
    before the tag existed)."""
    if tags.get(TAG_MODEL_SHA):
        return f"sha256:{tags[TAG_MODEL_SHA]}"
    return f"bundle:{tags[TAG_BUNDLE_VERSION]}" if tags.get(TAG_BUNDLE_VERSION) else None


def model_ds(tags: Mapping[str, str]) -> str | None:
    """The ds the version's model was trained for (a refresh: its model's, not its tables')."""
    return tags.get(TAG_MODEL_DS) or tags.get(TAG_DS)


def tables_ds(tags: Mapping[str, str]) -> str | None:
    """The day of the tables (priors, members, catalog) the version's bundle carries."""
    return tags.get(TAG_TABLES_DS) or tags.get(TAG_DS)


def model_origin(version: str | int, settings: Settings | None = None) -> ModelVersion:
    """The trained version whose model ``version`` serves (itself unless it is a refresh)."""
    mv = get_version(version, settings)
    origin = mv.tags.get(TAG_MODEL_FROM)
    return get_version(origin, settings) if origin and origin != str(mv.version) else mv


def get_version(version: str | int, settings: Settings | None = None) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    settings = settings or default_settings()
    try:
        return client(settings).get_model_version(settings.registered_model, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{settings.registered_model} has no version {version}: {exc.message}") from None


def get_alias_version(alias: str, settings: Settings | None = None, name: str | None = None) -> str | None:
    """The version number behind ``alias`` of ``name`` (default: the registered model), or
    None when there is no registry, no such model or no such alias. Other registry errors
    (unreachable server, ...) propagate: "nothing there" and "cannot tell" differ."""
    settings = settings or default_settings()
    if not registry_exists(settings):
        return None
    mv = _model_version(name or settings.registered_model, alias, None, settings)
    return None if mv is None else str(mv.version)


def _model_version(name: str, alias: str | None, version: str | None, settings: Settings):
    """The ModelVersion behind ``alias`` (or number ``version``) of ``name``, or None when the
    registry has no such model, alias or version; other registry errors propagate."""
    from mlflow.exceptions import MlflowException

    try:
        return (client(settings).get_model_version_by_alias(name, alias) if version is None
                else client(settings).get_model_version(name, version))
    except MlflowException as exc:
        if exc.error_code in _MISSING:
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
    from mlflow.exceptions import MlflowException

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
    """Restore the newest earlier champion that serves another model; return (rolled back,
    restored). Table refreshes of the current model are skipped: rolling back is about the
    model, and going back to the same model with older tables would change nothing a
    reviewer asked for."""
    settings = settings or default_settings()
    current = get_champion_version(settings)
    if current is None:
        raise RegistryError("there is no champion to roll back")
    history = champion_history(settings)
    by_version = {str(v.version): v for v in versions(settings)}
    current_model = model_identity(by_version[current].tags) if current in by_version else None

    def other_model(v: str) -> bool:
        return v != current and (current_model is None or model_identity(by_version[v].tags) != current_model)

    idx = next((i for i in range(len(history) - 1, -1, -1)
                if history[i] in by_version and other_model(history[i])), None)
    if idx is None:
        raise RegistryError(f"no earlier champion serves another model than version {current}; nothing to roll back to")
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
# Model URIs and downloads
# ---------------------------------------------------------------------------------------

def champion_uri(settings: Settings | None = None) -> str:
    """``models:/<registered model>@champion``: what serving loads unless told otherwise."""
    settings = settings or default_settings()
    return f"{MODELS_SCHEME}{settings.registered_model}@{CHAMPION}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of a ``models:/`` URI; exactly one of alias and version is
    set, and a bare ``models:/<name>`` means its champion."""
    spec = uri.removeprefix(MODELS_SCHEME)
    if "@" in spec:
        name, alias = spec.split("@", 1)
        return name, alias, None
    if "/" in spec:
        name, version = spec.split("/", 1)
        return name, None, version
    return spec, CHAMPION, None


@dataclass(frozen=True)
class Resolved:
    """The bundle a model URI points at right now.

    ``identity`` names it for people: ``models:/<name>/<version>`` for a registry version,
    ``<folder>:<bundle_version>`` for a bundle folder. ``key`` changes exactly when the URI
    comes to point at another bundle (serving reloads on a change): a version number names a
    bundle only within one registry, so a registry version's key also carries the bundle
    checksum it records (``keyart.bundle_sha256``), and a tracking store created again under
    the same URI, whose version 1 is another bundle, is not mistaken for the old one.
    """

    identity: str
    name: str | None = None  # registered model; None for a folder
    version: str | None = None  # registry version number; None for a folder
    path: Path | None = None  # the folder, for a folder URI
    checksum: str | None = None  # the bundle checksum the registry version records, if any

    @property
    def key(self) -> str:
        return f"{self.identity}#sha256:{self.checksum}" if self.checksum else self.identity


def resolve(uri: str, settings: Settings | None = None, strict: bool = False) -> Resolved | None:
    """What ``uri`` points at, or None when nothing is there (no such folder or manifest,
    no registry yet, no such model or alias). Other registry errors propagate. With
    ``strict``, a folder URI whose folder is missing or whose manifest cannot be read
    raises :class:`keyart.bundle.BundleError` (reason ``missing_folder``, ``no_manifest``,
    ``bad_manifest``) instead of giving None: serving reports and counts it."""
    if not uri.startswith(MODELS_SCHEME):
        path = Path(uri.removeprefix("file://")).resolve()
        try:
            if not path.is_dir():
                raise bundle.BundleError(f"{path}: no such bundle folder", "missing_folder")
            return Resolved(f"{path}:{bundle.read_manifest(path).version}", path=path)
        except bundle.BundleError:
            if strict:
                raise
            return None
    settings = settings or default_settings()
    if not registry_exists(settings):
        return None
    name, alias, version = parse_model_uri(uri)
    mv = _model_version(name, alias, version, settings)
    if mv is None:
        return None
    return Resolved(f"{MODELS_SCHEME}{name}/{mv.version}", name=name, version=str(mv.version),
                    checksum=(mv.tags or {}).get(TAG_SHA) or None)


def fetch(found: Resolved, settings: Settings | None = None) -> Path:
    """A local folder holding the bundle ``found`` names (a registry version is downloaded
    and verified once, see :func:`download_bundle`)."""
    if found.path is not None:
        return found.path
    return download_bundle(found.version, settings, name=found.name, checksum=found.checksum)


def bundle_path(uri: str, settings: Settings | None = None) -> Path | None:
    """The bundle ``uri`` points at as a local folder, or None when nothing is there."""
    found = resolve(uri, settings)
    return None if found is None else fetch(found, settings)


def champion_bundle_path(settings: Settings | None = None) -> Path | None:
    """The champion's bundle as a verified local folder, or None when there is no champion."""
    return bundle_path(champion_uri(settings), settings)


def _recorded_checksum(name: str, version: str | int, settings: Settings) -> str | None:
    """The bundle checksum version ``version`` of ``name`` records (``keyart.bundle_sha256``);
    None for a version without one, or when the registry cannot say (then a verified cached
    copy is used as before, with a warning)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client(settings).get_model_version(name, str(version))
    except MlflowException as exc:
        log.warning("%s version %s: cannot read its recorded checksum (%s); a cached copy is not checked against it",
                    name, version, exc.message)
        return None
    return (mv.tags or {}).get(TAG_SHA) or None


def _discard(folder: Path) -> None:
    """Move ``folder`` aside (atomic: another process sees it or not) and delete it."""
    aside = folder.parent / f".{folder.name}-discarded-{os.getpid()}-{time.monotonic_ns()}"
    try:
        folder.rename(aside)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(aside, ignore_errors=True)


def bundle_cache_dir(settings: Settings) -> Path:
    """The one download cache of registry bundles (serving and evaluation share it)."""
    return settings.home / "cache" / "bundles"


def find_bundle_dir(root: Path) -> Path:
    """The folder holding manifest.json inside a downloaded artifact tree."""
    root = Path(root)
    if (root / bundle.MANIFEST).is_file():
        return root
    hits = sorted(root.rglob(bundle.MANIFEST), key=lambda p: len(p.parts))
    if not hits:
        raise bundle.BundleError(f"{root}: downloaded artifacts hold no {bundle.MANIFEST}")
    return hits[0].parent


_LOOK_UP: Any = object()
"""``download_bundle``'s default ``checksum``: read what the version records from the registry."""


def download_bundle(version: str | int, settings: Settings | None = None, name: str | None = None,
                    checksum: str | None = _LOOK_UP) -> Path:
    """Version ``version`` of ``name`` (default: the registered model) as a verified folder
    ``<cache>/<name>-v<version>/``, downloaded once.

    The download goes to a temporary folder and is renamed into place only after it
    verifies, so a half-written or corrupt copy is never reused; a cached copy that no
    longer verifies is downloaded again. Concurrent downloads (serving workers) are safe:
    the first rename wins and the others use its copy.

    A version number names a bundle only within one registry: a store created again under
    the same home (``make demo`` twice, a restored or re-created tracking database) numbers
    its versions from 1 again. So a cached copy is used only when its checksum
    (:func:`bundle_checksum`) is the one the version records (``keyart.bundle_sha256``), and
    a download that does not match it is refused (:class:`RegistryError`). A caller that has
    just read the version (:func:`resolve`) passes the checksum it records as ``checksum``
    (None: it records none); by default it is read from the registry.
    """
    import mlflow.artifacts

    settings = configure(settings)
    name = name or settings.registered_model
    cache = bundle_cache_dir(settings)
    target = cache / f"{name}-v{version}"
    expected = _recorded_checksum(name, version, settings) if checksum is _LOOK_UP else checksum
    if target.is_dir():
        try:
            bundle.verify(target)
            if expected is None or (cached := bundle_checksum(target)) == expected:
                return target
            log.warning("cached bundle %s is not version %s of this registry (checksum %s, the version records %s); "
                        "downloading again", target, version, cached[:12], expected[:12])
        except bundle.BundleError:
            log.warning("cached bundle %s is damaged; downloading again", target)
        _discard(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{MODELS_SCHEME}{name}/{version}",
                                                    dst_path=str(tmp))
        local = find_bundle_dir(Path(local))
        bundle.verify(local)
        if expected is not None and (got := bundle_checksum(local)) != expected:
            raise RegistryError(f"{name} version {version}: the downloaded bundle's checksum "
                                f"{got[:12]} is not the one the version records ({expected[:12]})")
        try:
            local.rename(target)
        except OSError:  # another process won the race
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
