"""``keyart gate --ds D``: the promotion gate, challenger -> champion only if it wins.

The version registered for ``ds`` becomes ``champion`` when

1. its ONNX parity check passed (version tag ``keyart.parity_passed`` = ``true``), and
2. there is no champion yet, or the challenger is better than the champion on the same
   held-out impressions: the lower bound of the paired difference V_challenger -
   V_champion under SNIPS (the default ``--estimator``; ``evaluation.json``'s
   ``difference.candidate_minus_champion``, logged as
   ``difference.candidate_minus_champion.snips.lo``) exceeds ``settings.promotion_margin``.

Both policies are valued on the same bootstrap resamples of the same impressions, so the
interval of their difference is much narrower than either policy's own interval: comparing
one policy's lower bound with the other's point estimate would ask a better challenger to
win by a whole interval half-width, and keep a stale champion for good.

SNIPS is the default because it needs only the logged propensities, not the candidate's own
reward model (which DR would use to value its own policy); ``--estimator dr`` switches.
Otherwise the champion stays. Either way the decision and its reason are written to the
run (tags ``keyart.gate.*``, metrics ``gate.*``) and to the version's tags. Re-running the
gate for a ds that was already decided returns the recorded decision (``--force`` decides
again), so Airflow retries do not flip aliases.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass

from keyart import registry
from keyart.config import Settings
from keyart.config import settings as default_settings
from keyart.lake import fmt_ds

log = logging.getLogger(__name__)

DEFAULT_ESTIMATOR = "snips"
ESTIMATORS = ("snips", "dr", "ips", "replay")
PROMOTED, KEPT, ALREADY = "promoted", "kept", "already_champion"


@dataclass(frozen=True)
class GateInputs:
    """Everything the decision looks at (all read from the registry)."""

    version: str
    parity_passed: str  # "true" | "false" | "unknown"
    champion_version: str | None
    challenger_lo: float | None
    champion_estimate: float | None
    margin: float
    difference_lo: float | None = None  # lower bound of V_challenger - V_champion (paired)
    difference: float | None = None  # its point estimate
    estimator: str = DEFAULT_ESTIMATOR
    eval_champion_bundle: str | None = None  # bundle_version evaluation compared against
    champion_bundle: str | None = None  # bundle_version of the current champion


@dataclass(frozen=True)
class GateDecision:
    decision: str  # promoted | kept | already_champion
    reason: str

    @property
    def promote(self) -> bool:
        return self.decision == PROMOTED


def decide(g: GateInputs) -> GateDecision:
    """The gate rule (pure): parity first, then the paired OPE difference against the champion."""
    if g.champion_version is not None and g.champion_version == g.version:
        return GateDecision(ALREADY, f"version {g.version} is already the champion")
    if g.parity_passed != "true":
        return GateDecision(KEPT, f"ONNX parity did not pass (parity_passed={g.parity_passed})")
    if g.champion_version is None:
        return GateDecision(PROMOTED, "no champion yet; parity passed")
    if g.eval_champion_bundle is not None and g.eval_champion_bundle != g.champion_bundle:
        return GateDecision(KEPT, f"evaluation compared against bundle {g.eval_champion_bundle}, but "
                                  f"champion v{g.champion_version} is bundle {g.champion_bundle}; "
                                  "re-run evaluate")
    if g.difference_lo is None:
        return GateDecision(KEPT, f"no paired {g.estimator} difference against champion "
                                  f"v{g.champion_version} on the held-out day; re-run evaluate")
    versus = (f"{g.estimator} challenger - champion v{g.champion_version} = {_num(g.difference)}, "
              f"lower bound {g.difference_lo:.5f}")
    context = f" (challenger {_num(g.challenger_lo, 'lo ')}, champion {_num(g.champion_estimate)})"
    if g.difference_lo > g.margin:
        return GateDecision(PROMOTED, f"{versus} > margin {g.margin:g}{context}")
    return GateDecision(KEPT, f"{versus} <= margin {g.margin:g}{context}")


def _num(v: float | None, prefix: str = "") -> str:
    return "n/a" if v is None else f"{prefix}{v:.5f}"


@dataclass(frozen=True)
class GateResult:
    ds: str
    version: str
    decision: str
    reason: str
    champion: str | None
    recorded_earlier: bool = False


def gate_inputs(version: str, settings: Settings, estimator: str = DEFAULT_ESTIMATOR) -> GateInputs:
    """Collect the decision inputs for ``version`` from its tags and its run's metrics."""
    mv = registry.get_version(version, settings)
    metrics = registry.client(settings).get_run(mv.run_id).data.metrics if mv.run_id else {}
    champion = registry.get_champion_version(settings)
    champion_bundle = (registry.get_version(champion, settings).tags.get("keyart.bundle_version")
                       if champion is not None else None)
    return GateInputs(
        version=str(mv.version),
        parity_passed=mv.tags.get("keyart.parity_passed", "unknown"),
        champion_version=champion,
        challenger_lo=metrics.get(f"ope.candidate.{estimator}.lo"),
        champion_estimate=metrics.get(f"ope.champion.{estimator}.estimate"),
        margin=settings.promotion_margin,
        difference_lo=metrics.get(f"difference.candidate_minus_champion.{estimator}.lo"),
        difference=metrics.get(f"difference.candidate_minus_champion.{estimator}.estimate"),
        estimator=estimator,
        eval_champion_bundle=mv.tags.get("keyart.eval_champion_bundle"),
        champion_bundle=champion_bundle,
    )


def gate(ds: str, settings: Settings | None = None, estimator: str = DEFAULT_ESTIMATOR,
         force: bool = False) -> GateResult:
    """Run the promotion gate for the newest version registered for ``ds``."""
    settings = registry.configure(settings)
    ds = fmt_ds(ds)
    found = registry.versions_for_ds(ds, settings)
    if not found:
        raise registry.RegistryError(f"no version of {settings.registered_model} is registered "
                                     f"for ds={ds}; run `keyart register --ds {ds}` first")
    mv = found[0]
    if not force and "keyart.gate.decision" in mv.tags:
        log.info("ds=%s version %s was already gated: %s", ds, str(mv.version), mv.tags["keyart.gate.decision"])
        return GateResult(ds, str(mv.version), mv.tags["keyart.gate.decision"],
                          mv.tags.get("keyart.gate.reason", ""),
                          registry.get_champion_version(settings), recorded_earlier=True)
    inputs = gate_inputs(str(mv.version), settings, estimator)
    decision = decide(inputs)
    if decision.promote:
        registry.promote(str(mv.version), decision.reason, actor="gate", settings=settings)
    champion = registry.get_champion_version(settings)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tags = {"keyart.gate.decision": decision.decision, "keyart.gate.reason": decision.reason,
            "keyart.gate.estimator": estimator, "keyart.gate.at": now,
            "keyart.gate.champion_before": inputs.champion_version or "none",
            "keyart.gate.champion_after": champion or "none"}
    registry.tag_version(str(mv.version), tags, settings)
    if mv.run_id:
        c = registry.client(settings)
        for key, value in tags.items():
            c.set_tag(mv.run_id, key, value)
        figures = {"gate.promoted": float(decision.promote), "gate.margin": inputs.margin,
                   "gate.challenger_lo": inputs.challenger_lo,
                   "gate.difference_lo": inputs.difference_lo,
                   "gate.champion_estimate": inputs.champion_estimate}
        for key, value in figures.items():
            if value is not None:
                c.log_metric(mv.run_id, key, float(value))
    log.info("gate ds=%s version %s: %s (%s); champion %s", ds, str(mv.version),
             decision.decision, decision.reason, champion)
    return GateResult(ds, str(mv.version), decision.decision, decision.reason, champion)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, help="partition date YYYY-MM-DD whose version to gate")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=DEFAULT_ESTIMATOR,
                        help="OPE estimator of the paired difference against the champion (default snips)")
    parser.add_argument("--force", action="store_true", help="decide again even if already gated")


def run(args: argparse.Namespace) -> int:
    try:
        result = gate(args.ds, default_settings(), args.estimator, args.force)
    except registry.RegistryError as exc:
        log.error("gate: %s", exc)
        return 1
    print(json.dumps(asdict(result)))
    return 0
