"""Loading, validating and hot-swapping the model bundle.

The model URI is a bundle folder or ``models:/<name>@<alias>`` (default
``models:/keyart-artwork@champion``) or ``models:/<name>/<version>``. Registry bundles are
downloaded with MLflow into ``<home>/serving-cache/<name>-v<version>`` (downloaded to a
temporary folder, then renamed, so a half-downloaded copy is never reused).

A candidate bundle is swapped in only after :func:`keyart.bundle.verify` (files, checksums,
feature-spec version), a successful build of its tables and an ONNX session, and a parity
probe: the manifest's stored probe rows (``probe.features`` / ``probe.scores``) must score
within ``PROBE_TOLERANCE``; without them, a smoke batch must give finite probabilities
whose rows sum to 1. The swap is one reference assignment, so a request sees either the
old or the new bundle, never a mix. A background thread re-resolves the URI every
``serve_poll_seconds``; a bad bundle is logged, counted and remembered (not retried until
the alias moves again) while the last good one keeps serving. With no bundle at all the
store loads the lake catalog (``<lake>/catalog/artworks``) for default-artwork serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from keyart import bundle as kbundle
from keyart import feature_spec
from keyart.config import Settings
from keyart.lake import Lake
from keyart.policy import PolicyConfig
from keyart.serving.tables import ArtworkTable, MemberTable, not_expired, read_rows

log = logging.getLogger("keyart.serving.bundle")
PROBE_TOLERANCE = 1e-4
DEFAULT_ALIAS = "champion"


@dataclass
class LoadedBundle:
    """A validated bundle ready to serve."""

    version: str
    source: str
    path: Path
    manifest: kbundle.Manifest
    artworks: ArtworkTable
    members: MemberTable
    session: ort.InferenceSession
    policy: PolicyConfig
    priors_ds: str | None = None
    # the policy's segment-'all' Beta posteriors with today's online rewards ([N] each),
    # bound by OnlinePriors before the bundle is swapped in
    prior_alpha: np.ndarray | None = None
    prior_beta: np.ndarray | None = None
    prior_n: np.ndarray | None = None

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(quality play) of every row of ``x`` [R, N_FEATURES] in one model call: [R]."""
        return self.session.run([kbundle.OUTPUT_NAME], {kbundle.INPUT_NAME: x})[0][:, 1]


def make_session(model_path: Path) -> ort.InferenceSession:
    """One single-threaded CPU session (scale with processes, not threads)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def parity_probe(b: LoadedBundle) -> None:
    """Refuse a model whose outputs are malformed or differ from the manifest's probe."""
    inputs = [i.name for i in b.session.get_inputs()]
    outputs = [o.name for o in b.session.get_outputs()]
    if inputs != [kbundle.INPUT_NAME] or kbundle.OUTPUT_NAME not in outputs:
        raise kbundle.BundleError(f"model inputs {inputs} / outputs {outputs}: need input "
                                  f"{kbundle.INPUT_NAME!r} and output {kbundle.OUTPUT_NAME!r}")
    probe = b.manifest.get("probe") or (b.manifest.get("parity") or {}).get("probe")
    if probe and probe.get("features"):
        x = np.asarray(probe["features"], dtype=np.float32)
        want = np.asarray(probe["scores"], dtype=np.float64)
        got = b.score(x).astype(np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=PROBE_TOLERANCE):
            worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
            raise kbundle.BundleError(f"{b.path}: parity probe failed (max |dp| = {worst:.3g} > {PROBE_TOLERANCE})")
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(64, feature_spec.N_FEATURES)).astype(np.float32)
    full = b.session.run([kbundle.OUTPUT_NAME], {kbundle.INPUT_NAME: x})[0]
    if full.shape != (64, 2) or not np.all(np.isfinite(full)) or np.any(full < 0) or np.any(full > 1) \
            or not np.allclose(full.sum(axis=1), 1.0, atol=1e-4):
        raise kbundle.BundleError(f"{b.path}: model output is not [N, 2] probabilities")


def load_bundle(path: Path, source: str, settings: Settings) -> LoadedBundle:
    """Verify, load and probe the bundle at ``path``; :class:`BundleError` on any failure."""
    path = Path(path)
    manifest = kbundle.verify(path)
    try:
        # keep artworks that start later (resolved per request); drop only the retired ones
        arts = [r for r in read_rows(path / "artworks.parquet") if not_expired(r, dt.datetime.now(dt.UTC).date())]
        table = ArtworkTable.build(arts, read_rows(path / "priors.parquet"))
        members = MemberTable(read_rows(path / "members.parquet"), table.vocab)
        session = make_session(path / kbundle.MODEL_FILE)
    except kbundle.BundleError:
        raise
    except Exception as exc:  # any unreadable table or model refuses the bundle
        raise kbundle.BundleError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not table.artwork_ids:
        raise kbundle.BundleError(f"{path}: artworks.parquet has no active artwork")
    priors_ds = manifest.get("priors_ds") or manifest.get("ds")
    b = LoadedBundle(version=manifest.version, source=source, path=path, manifest=manifest,
                     artworks=table, members=members, session=session,
                     policy=PolicyConfig.from_settings(settings),
                     priors_ds=str(priors_ds) if priors_ds else None)
    try:
        parity_probe(b)
    except kbundle.BundleError:
        raise
    except Exception as exc:
        raise kbundle.BundleError(f"{path}: model fails to run ({type(exc).__name__}: {exc})") from exc
    return b


def find_bundle_dir(root: Path) -> Path:
    """The folder holding manifest.json inside a downloaded artifact tree."""
    root = Path(root)
    if (root / kbundle.MANIFEST).is_file():
        return root
    hits = sorted(root.rglob(kbundle.MANIFEST), key=lambda p: len(p.parts))
    if not hits:
        raise kbundle.BundleError(f"{root}: downloaded artifacts hold no {kbundle.MANIFEST}")
    return hits[0].parent


class Resolver:
    """Turns the model URI into (identity, local bundle folder)."""

    def __init__(self, uri: str, settings: Settings):
        self.uri = uri
        self.settings = settings
        self.is_registry = uri.startswith("models:/")

    def identity(self) -> str | None:
        """A string that changes when the URI points at another bundle; None if nothing is there."""
        if not self.is_registry:
            path = Path(self.uri.removeprefix("file://")).resolve()
            try:
                return f"{path}:{kbundle.read_manifest(path).version}"
            except kbundle.BundleError:
                return None
        name, version = self._registry_version()
        return None if version is None else f"models:/{name}/{version}"

    def _registry_version(self) -> tuple[str, str | None]:
        spec = self.uri.removeprefix("models:/")
        if "@" in spec:
            name, alias = spec.split("@", 1)
        elif "/" in spec:
            name, version = spec.split("/", 1)
            return name, version
        else:
            name, alias = spec, DEFAULT_ALIAS
        uri = self.settings.tracking_uri
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            return name, None  # no registry yet: creating one here would be a side effect
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            log.info("no model behind %s: %s", self.uri, str(exc).splitlines()[0][:200])
            return name, None
        return name, str(mv.version)

    def fetch(self, identity: str) -> Path:
        """A local folder with the bundle named by ``identity``."""
        if not self.is_registry:
            return Path(identity.rsplit(":", 1)[0])
        name, version = identity.removeprefix("models:/").rsplit("/", 1)
        cache = self.settings.home / "serving-cache" / f"{name}-v{version}"
        if not cache.is_dir():
            import mlflow

            mlflow.set_tracking_uri(self.settings.tracking_uri)
            mlflow.set_registry_uri(self.settings.tracking_uri)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
                tmp.rename(cache)
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return find_bundle_dir(cache)


class BundleStore:
    """The current bundle (or the fallback catalog), swapped atomically, polled in the background."""

    def __init__(self, settings: Settings, uri: str | None = None,
                 on_swap: Callable[[LoadedBundle], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.settings = settings
        self.uri = uri or settings.serve_model_uri or f"models:/{settings.registered_model}@{DEFAULT_ALIAS}"
        self.resolver = Resolver(self.uri, settings)
        self.current: LoadedBundle | None = None
        self.fallback: ArtworkTable | None = None
        self.bad: dict[str, str] = {}
        self._identity: str | None = None
        self._on_swap = on_swap
        self._on_event = on_event or (lambda event, fields: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poll_once(self) -> bool:
        """Load the bundle the URI points at if it changed; True if a new one was swapped in."""
        with self._lock:
            try:
                identity = self.resolver.identity()
            except Exception as exc:  # registry unreachable: keep serving what we have
                self._on_event("bundle_resolve_failed", {"uri": self.uri, "error": str(exc)[:300]})
                if self.current is None and self.fallback is None:
                    self.load_fallback()
                return False
            if identity is None or identity == self._identity or identity in self.bad:
                if self.current is None and self.fallback is None:
                    self.load_fallback()
                return False
            try:
                path = self.resolver.fetch(identity)
                new = load_bundle(path, identity, self.settings)
            except Exception as exc:
                self.bad[identity] = str(exc)
                self._on_event("bundle_refused", {"identity": identity, "error": str(exc)[:500],
                                                  "serving": self.current.version if self.current else None})
                if self.current is None and self.fallback is None:
                    self.load_fallback()
                return False
            if self._on_swap is not None:
                self._on_swap(new)
            self.current, self._identity = new, identity
            self._on_event("bundle_swapped", {"identity": identity, "version": new.version,
                                              "artworks": len(new.artworks.artwork_ids), "members": len(new.members)})
            return True

    def load_fallback(self) -> None:
        """The lake catalog's active artworks, for default-artwork serving without a model."""
        path = Lake(self.settings.lake).artworks
        try:
            rows = read_rows(path) if path.exists() else []
            today = dt.datetime.now(dt.UTC).date()
            self.fallback = ArtworkTable.build([r for r in rows if not_expired(r, today)]) if rows else None
        except Exception as exc:
            self._on_event("catalog_unreadable", {"path": str(path), "error": str(exc)[:300]})
            self.fallback = None
        self._on_event("fallback_mode", {"catalog": str(path),
                                         "artworks": len(self.fallback.artwork_ids) if self.fallback else 0})

    def start(self) -> None:
        """Poll every ``serve_poll_seconds`` in a daemon thread."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.settings.serve_poll_seconds):
                self.poll_once()

        self._thread = threading.Thread(target=loop, name="keyart-bundle-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
