"""``keyart gate --ds D``: the promotion gate, then what serving gets for the day.

The rule (:func:`decide`, pure) for the trained version registered for ``ds``:

1. its ONNX parity check must have passed (version tag ``keyart.parity_passed`` = ``true``);
2. with no champion yet it is promoted;
3. evaluation must have compared it with the current champion's model, on the same
   held-out impressions: the paired difference d = V_challenger - V_champion with its
   bootstrap interval [lo, hi] (``evaluation.json``'s ``difference.candidate_minus_champion``,
   by the estimator the setting ``promotion_estimator`` names, DR by default);
4. **hard block**: if hi < 0 the challenger is clearly worse and is never promoted,
   whatever the margin or the earlier days;
5. a challenger that is not fresher than the champion's model (trained for an earlier or the
   same ds: a backfill, a ``--replace`` retrain) must be better: lo > ``promotion_margin``;
6. **non-inferiority**: a fresher challenger is promoted unless it may be worse by more
   than delta = ``promotion_noninferiority_margin`` x V_champion: promoted when lo > -delta,
   or when the pooled lower bound is. The pooled evidence is today's difference combined
   (inverse-variance weights, the variances read off the bootstrap intervals) with the
   differences measured against the same champion model on the earlier held-out days of the
   last ``promotion_pool_days`` days, provided they agree with today's (a two-sided
   homogeneity test); pooling can only add evidence for a challenger, never hold one back.
   See docs/mlflow.md for why pooling is valid and for the default delta.

Then the day's tables go to serving whatever the decision: a promoted challenger carries
them already; when the champion is kept, :func:`publish` registers a *table refresh* (the
champion's model.onnx byte for byte with today's priors, member snapshot and catalog,
:func:`keyart.models.export.refresh_bundle`) and moves ``@champion`` to it, with the reason.

The decision, its reason, the figures and the evidence are written to the run (tags
``keyart.gate.*``, metrics ``gate.*``) and to the version; the version's description and
status (``keyart.status``) and the run's model card say what was decided and why
(:func:`keyart.models.register.record_decision`). Re-running the gate for a ds
already decided returns the recorded decision (``--force`` decides again) and publishes
only what an interrupted run did not, so Airflow retries neither flip aliases nor add versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy.stats import norm

from keyart import bundle, registry
from keyart.config import DEFAULT_PROMOTION_ESTIMATOR, Settings
from keyart.config import settings as default_settings
from keyart.lake import Lake, fmt_ds, shift_ds
from keyart.ope import ESTIMATORS

log = logging.getLogger(__name__)

PROMOTED, KEPT, ALREADY = "promoted", "kept", "already_champion"
LEVEL = 0.95
"""Two-sided level of evaluation's bootstrap intervals (keyart.ope.Bootstrap's default)."""
HOMOGENEITY_ALPHA = 0.05
"""Two-sided level at which today's difference and the earlier days' disagree (then not pooled)."""
EVIDENCE_TAG = "keyart.gate.evidence"
PUBLISHED_TAG = "keyart.gate.published"  # the champion version serving the day's tables
PUBLISH_NOTE_TAG = "keyart.gate.publish_note"


@dataclass(frozen=True)
class Evidence:
    """The paired difference V_challenger - V_champion on one held-out day, with its interval."""

    heldout_ds: str
    estimate: float
    lo: float
    hi: float

    def se(self, level: float = LEVEL) -> float:
        """Standard error read off the interval (its width over 2 z)."""
        return (self.hi - self.lo) / (2.0 * float(norm.ppf(0.5 + level / 2.0)))

    def usable(self) -> bool:
        # a percentile interval need not contain its point estimate; only its width is read
        return all(math.isfinite(v) for v in (self.estimate, self.lo, self.hi)) and self.lo <= self.hi


@dataclass(frozen=True)
class Pooled:
    """The evidence the non-inferiority rule reads."""

    estimate: float
    lo: float
    hi: float
    days: tuple[str, ...]
    note: str = ""


def pool(today: Evidence, previous: Sequence[Evidence], level: float = LEVEL,
         alpha: float = HOMOGENEITY_ALPHA) -> Pooled:
    """Today's difference combined with earlier days' (fixed-effect, inverse-variance weights).

    Only evidence with a positive-width interval is pooled, one per held-out day (today's
    day is never counted twice). The fixed-effect combination assumes the days measure the
    same difference; if today's and the earlier days' pooled difference disagree (two-sided
    z test at ``alpha``, Cochran's Q for two groups) today's challenger does not behave like
    the earlier ones and its own interval stands alone.
    """
    alone = Pooled(today.estimate, today.lo, today.hi, (today.heldout_ds,))
    se_today = today.se(level)
    if not se_today > 0:
        return Pooled(alone.estimate, alone.lo, alone.hi, alone.days, "today's interval has no width; not pooled")
    seen = {today.heldout_ds}
    prev = []
    for e in previous:
        if e.heldout_ds not in seen and e.usable() and e.se(level) > 0:
            seen.add(e.heldout_ds)
            prev.append(e)
    if not prev:
        return alone
    w_prev = [1.0 / e.se(level) ** 2 for e in prev]
    est_prev = sum(w * e.estimate for w, e in zip(w_prev, prev, strict=True)) / sum(w_prev)
    se_prev = 1.0 / math.sqrt(sum(w_prev))
    z = (today.estimate - est_prev) / math.hypot(se_today, se_prev)
    if abs(z) > float(norm.ppf(1.0 - alpha / 2.0)):
        return Pooled(alone.estimate, alone.lo, alone.hi, alone.days,
                      f"the {len(prev)} earlier day(s) disagree with today ({est_prev:+.5f}, z = {z:.2f}); "
                      "not pooled")
    w_all = [1.0 / se_today ** 2, *w_prev]
    est = (w_all[0] * today.estimate + sum(w_prev) * est_prev) / sum(w_all)
    half = float(norm.ppf(0.5 + level / 2.0)) / math.sqrt(sum(w_all))
    days = (today.heldout_ds, *(e.heldout_ds for e in prev))
    return Pooled(est, est - half, est + half, days)


@dataclass(frozen=True)
class GateInputs:
    """Everything the decision looks at (read from the registry by :func:`gate_inputs`)."""

    version: str
    parity_passed: str  # "true" | "false" | "unknown"
    champion_version: str | None
    today: Evidence | None = None  # paired difference on this run's held-out day
    previous: tuple[Evidence, ...] = ()  # earlier held-out days, same champion model and estimator
    champion_estimate: float | None = None  # V_champion on the held-out day (delta is relative to it)
    challenger_lo: float | None = None  # the challenger's own lower bound (context for the reason)
    noninferiority_margin: float = 0.05  # delta as a fraction of V_champion
    margin: float = 0.0  # superiority margin for a challenger that is not fresher
    challenger_ds: str | None = None  # the ds the challenger was trained for
    champion_model_ds: str | None = None  # the ds the champion's model was trained for
    estimator: str = DEFAULT_PROMOTION_ESTIMATOR
    eval_champion_model: str | None = None  # model identity evaluation compared against
    champion_model: str | None = None  # model identity of the current champion
    level: float = LEVEL

    @property
    def fresher(self) -> bool:
        """Trained for a later day than the champion's model (so on newer data)."""
        return bool(self.challenger_ds and self.champion_model_ds and self.challenger_ds > self.champion_model_ds)

    @property
    def delta(self) -> float:
        v = self.champion_estimate
        return self.noninferiority_margin * v if v is not None and math.isfinite(v) and v > 0 else 0.0


@dataclass(frozen=True)
class GateDecision:
    decision: str  # promoted | kept | already_champion
    reason: str
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def promote(self) -> bool:
        return self.decision == PROMOTED


def _iv(e: float, lo: float, hi: float) -> str:
    return f"{e:+.5f} [{lo:+.5f}, {hi:+.5f}]"


def decide(g: GateInputs) -> GateDecision:
    """The gate rule (pure): parity, then the paired OPE difference against the champion."""
    if g.champion_version is not None and g.champion_version == g.version:
        return GateDecision(ALREADY, f"version {g.version} is already the champion")
    if g.parity_passed != "true":
        return GateDecision(KEPT, f"ONNX parity did not pass (parity_passed={g.parity_passed})")
    if g.champion_version is None:
        return GateDecision(PROMOTED, "no champion yet; parity passed")
    if g.eval_champion_model is not None and g.eval_champion_model != g.champion_model:
        return GateDecision(KEPT, f"evaluation compared against model {g.eval_champion_model}, but champion "
                                  f"v{g.champion_version} serves model {g.champion_model}; re-run evaluate")
    t = g.today
    if t is None or not t.usable():
        return GateDecision(KEPT, f"no paired {g.estimator} difference against champion "
                                  f"v{g.champion_version} on the held-out day; re-run evaluate")
    figures = {"difference": t.estimate, "difference_lo": t.lo, "difference_hi": t.hi}
    versus = f"{g.estimator} challenger - champion v{g.champion_version} on {t.heldout_ds} = {_iv(t.estimate, t.lo, t.hi)}"
    context = (f" (challenger {'n/a' if g.challenger_lo is None else f'lo {g.challenger_lo:.5f}'}, "
               f"champion {'n/a' if g.champion_estimate is None else f'{g.champion_estimate:.5f}'})")
    if t.hi < 0:
        return GateDecision(KEPT, f"{versus}: upper bound < 0, clearly worse (hard block){context}", figures)
    if not g.fresher:
        rule = (f"not fresher than the champion's model (ds {g.challenger_ds} vs {g.champion_model_ds}): "
                f"needs lower bound > margin {g.margin:g}")
        if t.lo > g.margin:
            return GateDecision(PROMOTED, f"{versus}; {rule}: yes{context}", figures)
        return GateDecision(KEPT, f"{versus}; {rule}: no{context}", figures)
    p = pool(t, g.previous, g.level)
    delta = g.delta
    lo = max(t.lo, p.lo)  # pooling only adds evidence: today's own bound stands as well
    figures.update(pooled=p.estimate, pooled_lo=p.lo, pooled_hi=p.hi, pooled_days=float(len(p.days)), delta=delta)
    evidence = (f"pooled over {len(p.days)} held-out day(s) {_iv(p.estimate, p.lo, p.hi)}" if len(p.days) > 1
                else "today's day alone" + (f" ({p.note})" if p.note else ""))
    rule = (f"non-inferiority: lower bound {lo:+.5f} vs -delta = -{g.noninferiority_margin:g} x "
            f"V_champion = {-delta:+.5f}")
    if lo > -delta:
        return GateDecision(PROMOTED, f"{versus}; {evidence}; {rule}: not credibly worse{context}", figures)
    return GateDecision(KEPT, f"{versus}; {evidence}; {rule}: may be worse by more than delta{context}", figures)


@dataclass(frozen=True)
class GateResult:
    ds: str
    version: str | None  # None: the day's model was refused at export, nothing was registered
    decision: str
    reason: str
    champion: str | None
    recorded_earlier: bool = False
    published: str | None = None  # the champion version that serves the day's tables (None: none does)
    publish_note: str = ""


def _evidence_from(tags: Mapping[str, str], estimator: str) -> tuple[str | None, Evidence | None]:
    """(champion model, evidence) a version's gate recorded for ``estimator``."""
    raw = tags.get(EVIDENCE_TAG)
    if not raw:
        return None, None
    try:
        data = json.loads(raw)
        if data.get("estimator") != estimator:
            return None, None
        return data.get("champion_model"), Evidence(str(data["heldout_ds"]), float(data["estimate"]),
                                                    float(data["lo"]), float(data["hi"]))
    except (ValueError, KeyError, TypeError):
        return None, None


def previous_evidence(versions: Sequence[Any], version: str, heldout_ds: str, champion_model: str | None,
                      estimator: str, pool_days: int) -> tuple[Evidence, ...]:
    """Differences recorded by earlier gates against ``champion_model`` on the held-out days
    of the ``pool_days`` days ending at ``heldout_ds`` (today's excluded), newest version per day."""
    if champion_model is None or pool_days <= 1:
        return ()
    first = shift_ds(heldout_ds, -(pool_days - 1))
    out: dict[str, Evidence] = {}
    for v in versions:  # newest first
        if str(v.version) == version or registry.version_kind(v.tags) != registry.KIND_TRAINED:
            continue
        against, e = _evidence_from(v.tags, estimator)
        if e is None or against != champion_model or not first <= e.heldout_ds < heldout_ds:
            continue
        out.setdefault(e.heldout_ds, e)
    return tuple(out[d] for d in sorted(out, reverse=True))


def _float(v: Any) -> float | None:
    return float(v) if v is not None else None


def gate_inputs(version: str, settings: Settings, estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> GateInputs:
    """Collect the decision inputs for ``version`` from the registry's tags and its run's metrics."""
    all_versions = registry.versions(settings)
    by_version = {str(v.version): v for v in all_versions}
    mv = by_version.get(str(version)) or registry.get_version(version, settings)
    metrics = registry.client(settings).get_run(mv.run_id).data.metrics if mv.run_id else {}
    champion = registry.get_champion_version(settings)
    champion_tags = by_version[champion].tags if champion in by_version else {}
    champion_model = registry.model_identity(champion_tags)
    eval_bundle = mv.tags.get("keyart.eval_champion_bundle")
    eval_model = None
    if eval_bundle is not None:  # the version that bundle is, for its model identity
        match = next((v for v in all_versions if v.tags.get(registry.TAG_BUNDLE_VERSION) == eval_bundle), None)
        eval_model = registry.model_identity(match.tags) if match is not None else f"bundle:{eval_bundle}"
    key = f"difference.candidate_minus_champion.{estimator}"
    heldout = mv.tags.get("keyart.heldout_ds") or ""
    today = None
    if all(f"{key}.{k}" in metrics for k in ("estimate", "lo", "hi")):
        today = Evidence(heldout, metrics[f"{key}.estimate"], metrics[f"{key}.lo"], metrics[f"{key}.hi"])
    against = eval_model or champion_model
    return GateInputs(
        version=str(mv.version),
        parity_passed=mv.tags.get("keyart.parity_passed", "unknown"),
        champion_version=champion,
        today=today,
        previous=previous_evidence(all_versions, str(mv.version), heldout, against, estimator,
                                   settings.promotion_pool_days) if today is not None and heldout else (),
        champion_estimate=_float(metrics.get(f"ope.champion.{estimator}.estimate")),
        challenger_lo=_float(metrics.get(f"ope.candidate.{estimator}.lo")),
        noninferiority_margin=settings.promotion_noninferiority_margin,
        margin=settings.promotion_margin,
        challenger_ds=registry.model_ds(mv.tags),
        champion_model_ds=registry.model_ds(champion_tags),
        estimator=estimator,
        eval_champion_model=eval_model,
        champion_model=champion_model,
    )


# --- publishing the day's tables --------------------------------------------------------

def publish(ds: str, decision: GateDecision, version: str, settings: Settings) -> tuple[str | None, str]:
    """Make sure serving gets the tables of ``ds``: (the champion version that carries them or
    None, what was done).

    A promoted challenger (or one already champion) carries them. Otherwise the champion's
    model is refreshed with them (:func:`refresh_champion`).
    """
    if decision.decision in (PROMOTED, ALREADY):
        return version, f"version {version} (trained for {ds}) is the champion"
    return refresh_champion(ds, settings, f"gate for ds={ds} kept the champion: {decision.reason}")


def refresh_champion(ds: str, settings: Settings, reason: str) -> tuple[str | None, str]:
    """Register the champion's model with the tables of ``ds`` and move ``@champion`` to it.

    Nothing happens when there is no champion or it already serves tables of ``ds`` or later
    (a rerun, a backfill of an older day): the alias never goes back to older tables. A
    refresh of the same model for ``ds`` registered by an interrupted run is reused.
    """
    from keyart.models.export import refresh_bundle
    from keyart.models.register import champion_changed, register_refresh
    from keyart.policy import PolicyConfig

    champion = registry.get_champion_version(settings)
    if champion is None:
        return None, "no champion to refresh"
    mv = registry.get_version(champion, settings)
    current = registry.tables_ds(mv.tags)
    if current is not None and current >= ds:
        return champion, f"champion v{champion} already serves the tables of {current}"
    origin = registry.model_origin(champion, settings)
    lake = Lake(settings.lake)
    out = lake.run_dir(ds) / "refresh"
    refresh_bundle(lake, ds, registry.download_bundle(champion, settings), out, PolicyConfig.from_settings(settings),
                   origin={"registry_version": str(origin.version),
                           "bundle_version": origin.tags.get(registry.TAG_BUNDLE_VERSION),
                           "ds": registry.model_ds(origin.tags),
                           "heldout_ds": origin.tags.get("keyart.heldout_ds")})
    reg = register_refresh(ds, out, str(origin.version), champion, reason, settings)
    registry.promote(reg.version, f"table refresh: tables of {ds} for the model of version {origin.version} "
                                  f"(was v{champion}); {reason}", actor="gate", settings=settings)
    champion_changed(reg.version, champion, settings)
    note = f"table refresh v{reg.version}: the model of v{origin.version} with the tables of {ds} (was v{champion})"
    log.info("ds=%s: %s", ds, note)
    return reg.version, note


# --- the gate ---------------------------------------------------------------------------

DESCRIPTION_MARK = "**Gate decision"  # how keyart.models.register.decision_text starts


def _decision_record(tags: Mapping[str, str], decision: GateDecision) -> dict[str, Any]:
    """What :func:`keyart.models.register.record_decision` shows, from the gate's tags."""
    return {"decision": decision.decision, "reason": decision.reason, "at": tags.get("keyart.gate.at"),
            "champion_before": tags.get("keyart.gate.champion_before"),
            "champion_after": tags.get("keyart.gate.champion_after"),
            "published": tags.get(PUBLISHED_TAG), "publish_note": tags.get(PUBLISH_NOTE_TAG, ""),
            "estimator": tags.get("keyart.gate.estimator")}


def _record(mv: Any, tags: dict[str, str], figures: dict[str, float | None], settings: Settings) -> None:
    registry.tag_version(str(mv.version), tags, settings)
    if mv.run_id:
        c = registry.client(settings)
        for key, value in tags.items():
            c.set_tag(mv.run_id, key, value)
        for key, value in figures.items():
            if value is not None and math.isfinite(value):
                c.log_metric(mv.run_id, key, float(value))


def gate(ds: str, settings: Settings | None = None, estimator: str | None = None,
         force: bool = False) -> GateResult:
    """Run the promotion gate for the newest trained version registered for ``ds``, then
    publish the day's tables. ``estimator``: default the setting ``promotion_estimator``."""
    settings = registry.configure(settings)
    estimator = estimator or settings.promotion_estimator
    ds = fmt_ds(ds)
    found = registry.versions_for_ds(ds, settings)
    if not found:
        refusal = bundle.read_export_refusal(Lake(settings.lake).run_dir(ds))
        if refusal is not None:
            return _refused(ds, str(refusal.get("reason", "")), settings)
        raise registry.RegistryError(f"no version of {settings.registered_model} is registered "
                                     f"for ds={ds}; run `keyart register --ds {ds}` first")
    from keyart.models.register import airflow_tags, champion_changed, record_decision

    mv = found[0]
    version = str(mv.version)
    if not force and "keyart.gate.decision" in mv.tags:
        recorded = GateDecision(mv.tags["keyart.gate.decision"], mv.tags.get("keyart.gate.reason", ""))
        if PUBLISHED_TAG in mv.tags:
            published, note = mv.tags[PUBLISHED_TAG], mv.tags.get(PUBLISH_NOTE_TAG, "")
        else:  # the earlier run stopped before the day's tables were published
            published, note = publish(ds, recorded, version, settings)
            registry.tag_version(version, {PUBLISHED_TAG: published or "none", PUBLISH_NOTE_TAG: note}, settings)
        if not (mv.description or "").startswith(DESCRIPTION_MARK):  # an earlier run stopped before
            record_decision(version, _decision_record(registry.get_version(version, settings).tags, recorded), settings)
        log.info("ds=%s version %s was already gated: %s", ds, version, recorded.decision)
        return GateResult(ds, version, recorded.decision, recorded.reason, registry.get_champion_version(settings),
                          recorded_earlier=True, published=None if published == "none" else published,
                          publish_note=note)
    inputs = gate_inputs(version, settings, estimator)
    decision = decide(inputs)
    if decision.promote:
        registry.promote(version, decision.reason, actor="gate", settings=settings)
        champion_changed(version, inputs.champion_version, settings)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tags = {"keyart.gate.decision": decision.decision, "keyart.gate.reason": decision.reason,
            **airflow_tags("keyart.gate.airflow."),
            "keyart.gate.estimator": estimator, "keyart.gate.at": now,
            "keyart.gate.champion_before": inputs.champion_version or "none",
            "keyart.gate.champion_after": registry.get_champion_version(settings) or "none"}
    if inputs.today is not None:
        tags[EVIDENCE_TAG] = json.dumps({"estimator": estimator, **asdict(inputs.today),
                                         "champion_model": inputs.eval_champion_model or inputs.champion_model})
    figures: dict[str, float | None] = {
        "gate.promoted": float(decision.promote), "gate.margin": inputs.margin,
        "gate.noninferiority_margin": inputs.noninferiority_margin,
        "gate.challenger_lo": inputs.challenger_lo, "gate.champion_estimate": inputs.champion_estimate,
        **{f"gate.{k}": v for k, v in decision.figures.items()}}
    _record(mv, tags, figures, settings)
    published, note = publish(ds, decision, version, settings)
    champion = registry.get_champion_version(settings)
    _record(mv, {PUBLISHED_TAG: published or "none", PUBLISH_NOTE_TAG: note,
                 "keyart.gate.champion_after": champion or "none"}, {}, settings)
    record_decision(version, {**_decision_record({**tags, PUBLISHED_TAG: published or "none", PUBLISH_NOTE_TAG: note,
                                                  "keyart.gate.champion_after": champion or "none"}, decision),
                              "figures": decision.figures}, settings)
    log.info("gate ds=%s version %s: %s (%s); champion %s; %s", ds, version,
             decision.decision, decision.reason, champion, note)
    return GateResult(ds, version, decision.decision, decision.reason, champion, published=published,
                      publish_note=note)


def _refused(ds: str, why: str, settings: Settings) -> GateResult:
    """The day's model failed its export (nothing was registered for ``ds``): the champion is
    kept and, as on any kept day, republished with the day's tables; the refresh version's
    reason says why. A rerun finds the refresh already in place and adds nothing."""
    reason = f"the model trained for ds={ds} was not exported: {why}"
    champion_before = registry.get_champion_version(settings)
    published, note = refresh_champion(ds, settings, reason)
    log.warning("gate ds=%s: %s; champion %s; %s", ds, reason, champion_before, note)
    return GateResult(ds, None, KEPT, reason, registry.get_champion_version(settings),
                      published=published, publish_note=note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, help="partition date YYYY-MM-DD whose version to gate")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=None,
                        help="OPE estimator of the paired difference against the champion (default: the setting "
                        f"promotion_estimator, {DEFAULT_PROMOTION_ESTIMATOR} unless set)")
    parser.add_argument("--force", action="store_true", help="decide again even if already gated")


def run(args: argparse.Namespace) -> int:
    try:
        result = gate(args.ds, default_settings(), args.estimator, args.force)
    except registry.RegistryError as exc:
        log.error("gate: %s", exc)
        return 1
    print(json.dumps(asdict(result)))
    return 0

