"""Loading, validating and hot-swapping the model bundle.

The model URI is a bundle folder or ``models:/<name>@<alias>`` (default
``models:/keyart-artwork@champion``) or ``models:/<name>/<version>``. :mod:`keyart.registry`
resolves it and downloads registry versions (into the cache offline evaluation uses too);
this module only decides when to load and what to swap in.

A candidate bundle is swapped in only after :func:`keyart.bundle.verify` (files, checksums,
feature-spec version), a successful build of its tables and of its
:class:`keyart.scoring.OnnxScorer` (the scorer export's parity check ran), and a parity
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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keyart import bundle as kbundle
from keyart import feature_spec, registry
from keyart.config import Settings
from keyart.lake import Lake
from keyart.policy import PolicyConfig
from keyart.scoring import OnnxScorer
from keyart.serving.tables import ArtworkTable, MemberTable, not_expired, read_rows

log = logging.getLogger("keyart.serving.bundle")
PROBE_TOLERANCE = 1e-4


@dataclass
class LoadedBundle:
    """A validated bundle ready to serve."""

    version: str
    source: str
    path: Path
    manifest: kbundle.Manifest
    artworks: ArtworkTable
    members: MemberTable
    scorer: OnnxScorer
    policy: PolicyConfig
    priors_ds: str | None = None
    # the policy's segment-'all' Beta posteriors with today's online rewards ([N] each),
    # bound by OnlinePriors before the bundle is swapped in
    prior_alpha: np.ndarray | None = None
    prior_beta: np.ndarray | None = None
    prior_n: np.ndarray | None = None

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(quality play) of every row of ``x`` [R, N_FEATURES] (float32, C-contiguous, as
        :func:`keyart.serving.page.page_matrix` builds it) in one model call: [R]."""
        return self.scorer.score(x)


def parity_probe(b: LoadedBundle) -> None:
    """Refuse a model whose outputs are malformed or differ from the manifest's probe
    (input and output names and widths were checked when its scorer was built)."""
    probe = b.manifest.get("probe") or (b.manifest.get("parity") or {}).get("probe")
    if probe and probe.get("features"):
        want = np.asarray(probe["scores"], dtype=np.float64)
        got = b.scorer.predict(probe["features"]).astype(np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=PROBE_TOLERANCE):
            worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
            raise kbundle.BundleError(f"{b.path}: parity probe failed (max |dp| = {worst:.3g} > {PROBE_TOLERANCE})")
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(64, feature_spec.N_FEATURES)).astype(np.float32)
    full = b.scorer.predict_proba(x)
    if full.shape != (64, 2) or not np.all(np.isfinite(full)) or np.any(full < 0) or np.any(full > 1) \
            or not np.allclose(full.sum(axis=1), 1.0, atol=1e-4):
        raise kbundle.BundleError(f"{b.path}: model output is not [N, 2] probabilities")


def load_bundle(path: Path, source: str, settings: Settings) -> LoadedBundle:
    """Verify, load and probe the bundle at ``path``; :class:`BundleError` on any failure."""
    path = Path(path)
    manifest = kbundle.verify(path)
    try:
        # keep artworks that start later (resolved per request); drop only the retired ones
        arts = [r for r in read_rows(path / kbundle.ARTWORKS_FILE) if not_expired(r, dt.datetime.now(dt.UTC).date())]
        table = ArtworkTable.build(arts, read_rows(path / kbundle.PRIORS_FILE))
        members = MemberTable(read_rows(path / kbundle.MEMBERS_FILE), table.vocab)
        scorer = OnnxScorer(path / kbundle.MODEL_FILE)
    except kbundle.BundleError:
        raise
    except Exception as exc:  # any unreadable table or model refuses the bundle
        raise kbundle.BundleError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not table.artwork_ids:
        raise kbundle.BundleError(f"{path}: {kbundle.ARTWORKS_FILE} has no active artwork")
    priors_ds = manifest.get("priors_ds") or manifest.get("ds")
    b = LoadedBundle(version=manifest.version, source=source, path=path, manifest=manifest,
                     artworks=table, members=members, scorer=scorer,
                     policy=PolicyConfig.from_settings(settings),
                     priors_ds=str(priors_ds) if priors_ds else None)
    try:
        parity_probe(b)
    except kbundle.BundleError:
        raise
    except Exception as exc:
        raise kbundle.BundleError(f"{path}: model fails to run ({type(exc).__name__}: {exc})") from exc
    return b


class Resolver:
    """Turns the model URI into what it points at and a local folder, via :mod:`keyart.registry`.

    No registry yet, no such model or alias, or no manifest in the folder: :meth:`resolve`
    gives None (serve without a model). A registry that cannot answer raises, and
    :meth:`BundleStore.poll_once` keeps serving what it has.
    """

    def __init__(self, uri: str, settings: Settings):
        self.uri = uri
        self.settings = settings

    def resolve(self) -> registry.Resolved | None:
        return registry.resolve(self.uri, self.settings)

    def fetch(self, found: registry.Resolved) -> Path:
        """A local folder with the bundle ``found`` names (registry versions downloaded once)."""
        return registry.fetch(found, self.settings)


class BundleStore:
    """The current bundle (or the fallback catalog), swapped atomically, polled in the background."""

    def __init__(self, settings: Settings, uri: str | None = None,
                 on_swap: Callable[[LoadedBundle], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.settings = settings
        self.uri = uri or settings.serve_model_uri or registry.champion_uri(settings)
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
                found = self.resolver.resolve()
            except Exception as exc:  # registry unreachable: keep serving what we have
                self._on_event("bundle_resolve_failed", {"uri": self.uri, "error": str(exc)[:300]})
                if self.current is None and self.fallback is None:
                    self.load_fallback()
                return False
            identity = found.identity if found is not None else None
            if identity is None or identity == self._identity or identity in self.bad:
                if self.current is None and self.fallback is None:
                    self.load_fallback()
                return False
            try:
                path = self.resolver.fetch(found)
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
