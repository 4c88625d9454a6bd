"""Loading, validating and hot-swapping the model bundle.

The model URI is a bundle folder or ``models:/<name>@<alias>`` (default
``models:/keyart-artwork@champion``) or ``models:/<name>/<version>``. :mod:`keyart.registry`
resolves it and downloads registry versions (into the cache offline evaluation uses too);
this module only decides when to load and what to swap in.

A candidate bundle is swapped in only after its signature verifies
(:func:`check_signature`: ``manifest.sig`` against the trusted public key(s); an unsigned
bundle only in ``serve_dev_mode``), :func:`keyart.bundle.verify` (files, checksums,
feature-spec version), a successful build of its tables and of its
:class:`keyart.scoring.OnnxScorer` (the scorer export's parity check ran), and a parity
probe: the manifest's stored probe rows (``probe.features`` / ``probe.scores``) must score
within ``PROBE_TOLERANCE``; without them, a smoke batch must give finite probabilities
whose rows sum to 1. The swap is one reference assignment, so a request sees either the
old or the new bundle, never a mix. A background thread re-resolves the URI every
``serve_poll_seconds``; the last good bundle keeps serving whatever goes wrong:

* a bundle that fails a check (:class:`keyart.bundle.BundleError`: its content is wrong)
  is refused and not tried again until the URI points elsewhere, or, for a signature
  refusal, until the trusted key file changes;
* a failure that may pass (the registry or the artifact store does not answer, a read
  error) is retried with exponential backoff, ``RETRY_BASE_SECONDS`` doubling up to
  ``RETRY_MAX_SECONDS`` between attempts, for as long as the URI points at that bundle:
  a hiccup never blacklists the new champion;
* a folder URI without a readable bundle (missing folder, no or non-JSON manifest) is
  reported once per distinct problem.

Every refusal and failed attempt is an event (``bundle_refused`` with its ``reason``,
``bundle_fetch_failed``, ``bundle_resolve_failed``) that the app logs and counts. With no
bundle at all the store loads the lake catalog (``<lake>/catalog/artworks``) for
default-artwork serving.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from keyart import bundle as kbundle
from keyart import feature_spec, registry
from keyart.config import Settings
from keyart.lake import Lake
from keyart.policy import PolicyConfig
from keyart.scoring import OnnxScorer
from keyart.serving.tables import ArtworkTable, MemberTable, not_expired, read_rows

log = logging.getLogger("keyart.serving.bundle")
PROBE_TOLERANCE = 1e-4
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# refusals that a new trusted key (a rotation, a key installed late) can lift
SIGNATURE_REASONS = frozenset({"unsigned", "bad_signature", "unknown_key", "no_trusted_key"})


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
    registry_version: str | None = None  # the MLflow version number; None for a folder
    signed_by: str | None = None  # key id of the verified signature; None = unchecked (dev mode)
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
            raise kbundle.BundleError(f"{b.path}: parity probe failed (max |dp| = {worst:.3g} > {PROBE_TOLERANCE})",
                                      "parity_probe")
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(64, feature_spec.N_FEATURES)).astype(np.float32)
    full = b.scorer.predict_proba(x)
    if full.shape != (64, 2) or not np.all(np.isfinite(full)) or np.any(full < 0) or np.any(full > 1) \
            or not np.allclose(full.sum(axis=1), 1.0, atol=1e-4):
        raise kbundle.BundleError(f"{b.path}: model output is not [N, 2] probabilities", "model_output")


def trusted_keys_state(settings: Settings) -> tuple[int, int] | None:
    """(mtime, size) of the trusted public key file, None while it does not exist: a change
    lifts the signature refusals (a key installed or rotated after a bundle was refused)."""
    try:
        st = kbundle.public_key_path(settings).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def check_signature(path: Path, settings: Settings) -> str | None:
    """The id of the trusted key that signed the bundle at ``path``; None when nothing was
    checked (only in ``serve_dev_mode``: an unsigned bundle, or no trusted key at all).
    :class:`BundleError` otherwise: a signature that does not verify is refused in every mode."""
    key_file = kbundle.public_key_path(settings)
    if settings.serve_bundle_public_key is None and not key_file.exists():
        if settings.serve_dev_mode:
            return None
        raise kbundle.BundleError(
            f"{path}: no trusted public key to check its signature: set serve_bundle_public_key "
            f"(KEYART_SERVE_BUNDLE_PUBLIC_KEY) to the public half of the daily run's bundle_signing_key "
            f"(default {key_file})", "no_trusted_key")
    trusted = kbundle.load_public_keys(key_file)
    try:
        return kbundle.verify_signature(path, trusted)
    except kbundle.BundleError as exc:
        if exc.reason == "unsigned" and settings.serve_dev_mode:
            return None
        raise


def load_bundle(path: Path, source: str, settings: Settings, registry_version: str | None = None) -> LoadedBundle:
    """Check the signature, verify, load and probe the bundle at ``path``.

    :class:`BundleError` (with its ``reason``) when the bundle itself is wrong; an
    :class:`OSError` (a read that failed) propagates as it is: it may pass on a retry."""
    path = Path(path)
    signed_by = check_signature(path, settings)  # before anything else of the folder is trusted
    manifest = kbundle.verify(path)
    try:
        # keep artworks that start later (resolved per request); drop only the retired ones
        arts = [r for r in read_rows(path / kbundle.ARTWORKS_FILE) if not_expired(r, dt.datetime.now(dt.UTC).date())]
        vocabulary = feature_spec.Vocabulary.from_dict(json.loads((path / kbundle.SPEC_FILE).read_text()).get("vocabulary"))
        table = ArtworkTable.build(arts, read_rows(path / kbundle.PRIORS_FILE), vocabulary)
        members = MemberTable(pq.read_table(path / kbundle.MEMBERS_FILE), table.vocab, table.vocabulary, table.resp_vocab)
        scorer = OnnxScorer(path / kbundle.MODEL_FILE)
    except (kbundle.BundleError, OSError):  # OSError: a read that failed, retried
        raise
    except Exception as exc:  # any unreadable table or model refuses the bundle
        raise kbundle.BundleError(f"{path}: cannot load ({type(exc).__name__}: {exc})", "unloadable") from exc
    if not table.artwork_ids:
        raise kbundle.BundleError(f"{path}: {kbundle.ARTWORKS_FILE} has no active artwork", "no_artwork")
    priors_ds = manifest.get("priors_ds") or manifest.get("ds")
    b = LoadedBundle(version=manifest.version, source=source, path=path, manifest=manifest,
                     artworks=table, members=members, scorer=scorer,
                     policy=PolicyConfig.from_settings(settings),
                     priors_ds=str(priors_ds) if priors_ds else None,
                     registry_version=registry_version, signed_by=signed_by)
    try:
        parity_probe(b)
    except kbundle.BundleError:
        raise
    except Exception as exc:
        raise kbundle.BundleError(f"{path}: model fails to run ({type(exc).__name__}: {exc})", "model_output") from exc
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
        """What the URI points at; a folder URI without a readable bundle raises
        :class:`BundleError` (reported), the registry's own errors propagate (retried)."""
        return registry.resolve(self.uri, self.settings, strict=True)

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
        self.bad: dict[str, str] = {}  # identity -> why it was refused
        self.retry_base_s = RETRY_BASE_SECONDS
        self.retry_max_s = RETRY_MAX_SECONDS
        self._bad_reason: dict[str, tuple[str, tuple[int, int] | None]] = {}  # identity -> (reason, trusted keys then)
        self._retry: dict[str, tuple[int, float]] = {}  # identity -> (failed attempts, monotonic time of the next)
        self._problem: tuple[str, str] | None = None  # the folder problem last reported
        self._identity: str | None = None
        self._on_swap = on_swap
        self._on_event = on_event or (lambda event, fields: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _keep_serving(self) -> bool:
        if self.current is None and self.fallback is None:
            self.load_fallback()
        return False

    def _skip(self, identity: str, now: float) -> bool:
        """True if ``identity`` is not to be tried now (refused, or its retry is not due)."""
        if identity in self.bad:
            reason, trust = self._bad_reason.get(identity, ("", None))
            if reason in SIGNATURE_REASONS and trust != trusted_keys_state(self.settings):
                del self.bad[identity], self._bad_reason[identity]  # the trusted keys changed: try again
            else:
                return True
        retry = self._retry.get(identity)
        return retry is not None and retry[1] > now

    def next_attempt_in(self) -> float | None:
        """Seconds until the earliest pending retry (None: none pending)."""
        if not self._retry:
            return None
        return max(0.0, min(t for _, t in self._retry.values()) - time.monotonic())

    def poll_once(self) -> bool:
        """Load the bundle the URI points at if it changed; True if a new one was swapped in."""
        with self._lock:
            try:
                found = self.resolver.resolve()
            except kbundle.BundleError as exc:  # a folder URI without a readable bundle
                problem = (exc.reason, str(exc))
                if problem != self._problem:
                    self._problem = problem
                    self._on_event("bundle_refused", {"identity": self.uri, "reason": exc.reason,
                                                      "error": str(exc)[:500], "retry": False,
                                                      "serving": self.current.version if self.current else None})
                return self._keep_serving()
            except Exception as exc:  # registry unreachable: keep serving what we have, ask again next poll
                self._on_event("bundle_resolve_failed", {"uri": self.uri, "error": str(exc)[:300],
                                                         "serving": self.current.version if self.current else None})
                return self._keep_serving()
            self._problem = None
            identity = found.key if found is not None else None
            now = time.monotonic()
            self._retry = {k: v for k, v in self._retry.items() if k == identity}  # the URI moved on
            if identity is None or identity == self._identity or self._skip(identity, now):
                return self._keep_serving()
            try:
                path = self.resolver.fetch(found)
                new = load_bundle(path, found.identity, self.settings, registry_version=found.version)
            except kbundle.BundleError as exc:  # the bundle itself is wrong: refused until the URI moves
                self._retry.pop(identity, None)
                self.bad[identity] = str(exc)
                self._bad_reason[identity] = (exc.reason, trusted_keys_state(self.settings))
                self._on_event("bundle_refused", {"identity": identity, "reason": exc.reason,
                                                  "error": str(exc)[:500], "retry": False,
                                                  "serving": self.current.version if self.current else None})
                return self._keep_serving()
            except Exception as exc:  # registry, artifact store or disk hiccup: retried with backoff
                attempts = self._retry.get(identity, (0, 0.0))[0] + 1
                delay = min(self.retry_base_s * 2 ** (attempts - 1), self.retry_max_s)
                self._retry[identity] = (attempts, now + delay)
                self._on_event("bundle_fetch_failed", {"identity": identity, "attempt": attempts,
                                                       "retry_in_s": round(delay, 3),
                                                       "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                                       "serving": self.current.version if self.current else None})
                return self._keep_serving()
            self._retry.pop(identity, None)
            if self._on_swap is not None:
                self._on_swap(new)
            self.current, self._identity = new, identity
            self._on_event("bundle_swapped", {"identity": identity, "version": new.version,
                                              "registry_version": new.registry_version, "signed_by": new.signed_by,
                                              "artworks": len(new.artworks.artwork_ids), "members": len(new.members)})
            if new.signed_by is None:
                self._on_event("bundle_signature_unchecked", {"identity": identity, "serve_dev_mode": True})
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
        """Poll every ``serve_poll_seconds`` (sooner when a retry is due) in a daemon thread."""
        if self._thread is not None:
            return

        def loop() -> None:
            while True:
                due = self.next_attempt_in()
                wait = self.settings.serve_poll_seconds if due is None else min(self.settings.serve_poll_seconds, due)
                if self._stop.wait(max(wait, 0.05)):
                    return
                try:
                    self.poll_once()
                except Exception as exc:  # never let the poller die
                    self._on_event("bundle_poll_failed", {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})

        self._thread = threading.Thread(target=loop, name="keyart-bundle-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
