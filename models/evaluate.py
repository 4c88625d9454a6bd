"""Offline evaluation of a run: value the policies on the held-out labelled day.

Policies valued (``evaluation.json`` keys):

``candidate``      the configured exploration policy on this run's model (model.txt)
``champion``       the same policy settings on the champion bundle's model.onnx
                   (``--champion-bundle``, else the registry's champion; skipped if none);
                   on the impressions the champion itself served, exactly the distribution
                   it served (logged with each impression)
``logging``        what was actually served: its on-policy mean reward (its importance
                   weights on the logged probabilities are 1: ``weights.logging.ess`` = n)
``random``         uniform over the candidates
``noncontextual``  ``beta_ts`` on the Beta priors (per-title Thompson, no model)

Distributions that are rebuilt (the candidate; the champion where it did not serve; the
baselines) come from :func:`keyart.policy.probabilities` on the training table's candidate
rows of the held-out day, with the Beta priors serving's online rule would have held at
each impression (:func:`online_priors`: the day-start priors plus the importance-weighted
evidence of the day's impressions whose attribution window had closed by then), and are
valued with replay, IPS, SNIPS and DR (:mod:`keyart.ope`). DR uses this run's model as
q-hat for every policy, so the policies are compared on the same footing; lifts are over
the logging policy with paired bootstrap intervals, and
``difference.candidate_minus_champion`` is V_candidate - V_champion with a paired bootstrap
interval (what the promotion gate reads). ``weights`` gives every policy's importance-weight
diagnostics (Kish's effective sample size and its share of n, the largest weight).

For the reviewer's plots (:func:`review_inputs`, drawn by :mod:`keyart.models.report`):
``calibration`` (this run's model on the shown artworks of the held-out impressions, per
decile of its prediction), ``per_title_lift`` (V_candidate - V_logging per title, SNIPS,
paired bootstrap clustered by member) and ``artwork_share`` (each policy's expected share of
impressions per artwork). ``candidate_vs_logging`` says how far the candidate's distribution
is from the logged one: on a uniformly logged day the policy gives back the uniform
distribution when it gives the model no weight (the blend weight n / (n + prior_blend_n0)
is 0 where no impression stands behind a candidate's prior, as on a lake's first day with
day-start priors) or the model's scores do not separate the candidates, and every estimate
of it then equals the logging policy's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from keyart import bundle
from keyart.config import settings
from keyart.lake import Lake, fmt_ds, heldout_day
from keyart.models.data import (
    PAGE_COLUMNS,
    feature_array,
    pages_from_frame,
    read_training,
    time_split_rows,
)
from keyart.ope import (
    ESTIMATORS,
    LOGGED_SUM_TOL,
    Bootstrap,
    LoggedPages,
    evaluate_policies,
    to_json,
    weight_diagnostics,
    weighted_evidence,
)
from keyart.policy import PolicyConfig, probabilities, residual_means

log = logging.getLogger(__name__)
BASELINES = ("random", "noncontextual")


BASELINE_SAMPLES = 128
"""Monte Carlo draws per impression for the non-contextual baseline's probabilities
(``beta_ts``). Its Beta priors move at every held-out impression (:func:`online_priors`), so
each impression gets its own estimate, and at serving's 1,024 draws this was most of
evaluation's time. Each estimate is unbiased and IPS, SNIPS and DR are (ratios of) sums
linear in the target's probabilities, so the draws' error averages out over the day: at
128 draws it moves the day's estimate by a small fraction of its bootstrap interval
(tests/models/test_baseline_samples.py)."""


def policy_targets(pages: LoggedPages, rows, scorers: dict[str, Callable[[], np.ndarray]],
                   cfg: PolicyConfig, seed: int = 0, baselines: bool = True,
                   priors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Candidate-row probabilities [n_rows] of every policy.

    ``scorers`` maps a model-based policy name to a function returning its model scores
    [n_rows]; ``random`` and ``noncontextual`` are added if ``baselines``. The Beta priors
    are ``priors`` (alpha, beta, n) [n_rows] (e.g. :func:`online_priors`), else ``rows``'.
    """
    if priors is None:
        priors = tuple(rows[c].to_numpy(dtype=np.float64) for c in ("prior_alpha", "prior_beta", "prior_n"))
    a, b, n = priors
    rng = np.random.default_rng(seed)
    artworks = rows["artwork_id"].astype(str).to_numpy()
    out = {}
    for name, score in scorers.items():
        q = score()
        # the residual blend's model mean: the model's mean score per artwork over these rows,
        # as export computes it for the bundle over the held-out day (keyart.models.export.model_means)
        out[name] = probabilities(cfg, q, pages.offsets, a, b, n, rng, model_mean=residual_means(cfg, q, artworks))
    if not baselines:
        return out
    zeros = np.zeros(pages.n_rows)
    out["random"] = probabilities(replace(cfg, name="random"), zeros, pages.offsets, a, b, n)
    out["noncontextual"] = probabilities(replace(cfg, name="beta_ts", thompson_samples=BASELINE_SAMPLES), zeros,
                                         pages.offsets, a, b, n, rng)
    return out


def _micros(ts: pd.Series) -> np.ndarray:
    """Microseconds since the epoch of a timestamp column (aware or naive UTC)."""
    ts = pd.to_datetime(ts, utc=True).dt.tz_convert(None)
    return ts.to_numpy(dtype="datetime64[us]").astype(np.int64)


def online_priors(pages: LoggedPages, rows: pd.DataFrame, window_hours: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segment-``all`` Beta priors [n_rows] serving's online rule would hold at each
    held-out impression, for every candidate row: the row's day-start prior (priors of the
    day before the impression, what the bundle serves with) plus the evidence of the logged
    impressions of the same decision day and artwork whose attribution window had closed
    by the impression's time, importance-weighted (w = 1 / (K propensity)) and turned into
    Beta counts by :func:`keyart.ope.weighted_evidence`, as serving and the priors job do.

    What is approximated, and why: (1) the day unfolds as logged: a rebuilt policy would
    have shown other artworks and so moved its own priors differently, which only a
    simulator can replay; (2) serving also counts the open windows, as rewards so far out
    of the share of the impressions whose outcome is known by then, which needs the
    rewards' arrival times: the training table has each impression's final label but not
    when it arrived, so open windows are left out. Both leave the expected prior mean as
    serving's (the open-window evidence is unbiased for the same rate), with less
    evidence behind it; (3) only the held-out table's impressions count, so an impression
    decided the day before the held-out day sees the evidence of that day's impressions
    labelled on the held-out day only.
    """
    a = rows["prior_alpha"].to_numpy(dtype=np.float64)
    b = rows["prior_beta"].to_numpy(dtype=np.float64)
    n = rows["prior_n"].to_numpy(dtype=np.float64)
    t = _micros(rows["ts"])
    code, _ = pd.factorize(rows["impression_ds"].astype(str) + "/" + rows["artwork_id"].astype(str))
    code = code.astype(np.int64)
    logged = pages.logged_row
    w = 1.0 / (np.diff(pages.offsets) * pages.propensity)
    close = t[logged] + int(window_hours * 3600e6)
    lo = int(min(t.min(), close.min()))
    span = int(max(t.max(), close.max())) - lo + 1
    keys = code[logged] * span + (close - lo)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    cums = [np.concatenate([[0.0], np.cumsum(x[order])]) for x in (w, w * w, w * pages.reward)]
    upto = np.searchsorted(keys, code * span + (t - lo), side="right")
    start = np.searchsorted(keys, code * span, side="left")
    sw, sww, swr = (c[upto] - c[start] for c in cums)
    s, f, e = weighted_evidence(sw, sww, swr)
    return a + s, b + f, n + e


def logged_probabilities(pages: LoggedPages, rows: pd.DataFrame) -> np.ndarray:
    """The logging policy's probability of every candidate row [n_rows] as logged with its
    impression (``logging_probability``), NaN where the impression carries none or they do
    not describe its draw (see :class:`keyart.ope.LoggedPages`). Uniform (``random``) and
    default-artwork (``default``) logging need none: their distribution is 1/K, or all on
    the shown artwork."""
    sizes = np.diff(pages.offsets)
    q = (rows["logging_probability"].to_numpy(dtype=np.float64, na_value=np.nan)
         if "logging_probability" in rows.columns else np.full(pages.n_rows, np.nan))
    missing = np.add.reduceat(np.isnan(q), pages.offsets[:-1]) > 0
    policy = rows["policy"].astype(str).to_numpy()[pages.logged_row]
    shown = np.zeros(pages.n_rows)
    shown[pages.logged_row] = 1.0
    for name, fill in (("random", 1.0 / np.repeat(sizes, sizes)), ("default", shown)):
        todo = np.repeat(missing & (policy == name), sizes)
        q[todo] = fill[todo]
        q[pages.logged_row[missing & (policy == name)]] = pages.propensity[missing & (policy == name)]
    with np.errstate(invalid="ignore"):
        sums = np.add.reduceat(q, pages.offsets[:-1])
        bad = ~((np.abs(sums - 1.0) <= LOGGED_SUM_TOL) & (q[pages.logged_row] == pages.propensity))
    q[np.repeat(bad, sizes)] = np.nan
    return q


def as_served(pages: LoggedPages, rows: pd.DataFrame, rebuilt: np.ndarray, version: str) -> tuple[np.ndarray, float]:
    """A model's distribution [n_rows]: on the impressions bundle ``version`` served (and
    logged the probabilities of), exactly what it served, whatever its online priors were
    then; elsewhere ``rebuilt``. Also the share of impressions taken from the logs."""
    versions = rows["model_version"].astype(str).to_numpy()[pages.logged_row]
    served = pages.logged_known & (versions == str(version))
    out = np.array(rebuilt, dtype=np.float64)
    if served.any():
        at = np.repeat(served, np.diff(pages.offsets))
        out[at] = pages.logging_target()[at]
    return out, float(served.mean())


CALIBRATION_BINS = 10
PER_TITLE_MIN_IMPRESSIONS = 50
"""Titles with fewer held-out impressions get no per-title lift (its interval would be noise)."""


def calibration(pages: LoggedPages, q_hat: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Predicted vs observed quality-play rate of the shown artworks, per quantile bin of the
    prediction: ``{"predicted", "observed", "count"}`` per bin, and the expected calibration
    error ``ece`` (count-weighted mean |predicted - observed|)."""
    pred = np.asarray(q_hat, dtype=np.float64)[pages.logged_row]
    edges = np.unique(np.quantile(pred, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(which, minlength=max(len(edges) - 1, 1))
    used = count > 0
    p_sum = np.bincount(which, weights=pred, minlength=len(count))
    r_sum = np.bincount(which, weights=pages.reward, minlength=len(count))
    predicted, observed = p_sum[used] / count[used], r_sum[used] / count[used]
    ece = float((count[used] * np.abs(predicted - observed)).sum() / count.sum())
    return {"predicted": predicted.tolist(), "observed": observed.tolist(), "count": count[used].tolist(),
            "ece": ece, "binning": f"{bins} quantile bins of the prediction, shown artworks"}


def per_title_lift(pages: LoggedPages, rows: pd.DataFrame, target: np.ndarray, n_boot: int = 200, seed: int = 0,
                   min_impressions: int = PER_TITLE_MIN_IMPRESSIONS) -> dict[str, dict[str, float]]:
    """Per title, V_target - V_logging (SNIPS against the on-policy mean reward) with a paired
    Poisson bootstrap interval clustered by member: ``{title_id: {estimate, lo, hi,
    impressions}}`` for titles with at least ``min_impressions`` held-out impressions."""
    w = pages.weights(target)
    r = pages.reward
    titles = rows["title_id"].astype(str).to_numpy()[pages.logged_row]
    groups = pages.groups if pages.groups is not None else np.arange(pages.n_impressions)
    boot = Bootstrap(n_boot=n_boot, seed=seed)
    out: dict[str, dict[str, float]] = {}
    for title in np.unique(titles):
        at = np.flatnonzero(titles == title)
        if len(at) < min_impressions or w[at].sum() <= 0:
            continue
        nums = np.vstack([w[at] * r[at], r[at]])
        dens = np.vstack([w[at], np.ones(len(at))])
        reps = boot.replicates(nums, dens, np.unique(groups[at], return_inverse=True)[1])
        point = float(nums[0].sum() / dens[0].sum() - r[at].mean())
        iv = boot.interval(point, reps[:, 0] - reps[:, 1])
        out[str(title)] = {**iv.to_dict(), "impressions": int(len(at))}
    return out


def artwork_share(pages: LoggedPages, rows: pd.DataFrame, targets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Each policy's expected share of the held-out impressions per artwork (its
    probabilities summed per artwork over n); ``logging``: the artworks actually shown."""
    arts = rows["artwork_id"].astype(str).to_numpy()
    codes, names = pd.factorize(arts)
    n = pages.n_impressions
    shown = np.zeros(pages.n_rows)
    shown[pages.logged_row] = 1.0
    out: dict[str, dict[str, float]] = {}
    for policy, probs in {"logging": shown, **targets}.items():
        share = np.bincount(codes, weights=np.asarray(probs, dtype=np.float64), minlength=len(names)) / n
        out[policy] = {str(a): round(float(v), 6) for a, v in zip(names, share, strict=True)}
    return out


def distance_to_logging(pages: LoggedPages, target: np.ndarray) -> dict[str, Any]:
    """How far a target distribution is from the logged one on the impressions that carry
    their logged probabilities (else from the shown artwork's propensity alone):
    the largest |difference| of a candidate's probability, and whether they are the same
    policy (then every estimate of the target is the logging policy's, by construction)."""
    if pages.logging is not None and pages.logged_known.any():
        at = np.repeat(pages.logged_known, np.diff(pages.offsets))
        gap = float(np.abs(np.asarray(target)[at] - pages.logging_target()[at]).max())
        basis = "logged probabilities"
    else:
        gap = float(np.abs(np.asarray(target)[pages.logged_row] - pages.propensity).max())
        basis = "propensity of the shown artwork"
    same = gap <= LOGGED_SUM_TOL
    note = ("the candidate's distribution is the logging policy's (the policy gave the model no weight, "
            "or its scores do not separate the candidates), so its estimates equal the logging policy's"
            if same else "")
    return {"max_abs_diff": gap, "same_policy": bool(same), "basis": basis, "note": note}


def review_inputs(pages: LoggedPages, rows: pd.DataFrame, targets: dict[str, np.ndarray], q_hat: np.ndarray,
                  n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """The optional evaluation.json fields the reviewer's plots read (see the module doc)."""
    return {"calibration": calibration(pages, q_hat),
            "per_title_lift": per_title_lift(pages, rows, targets["candidate"], n_boot=n_boot, seed=seed),
            "artwork_share": artwork_share(pages, rows, targets),
            "candidate_vs_logging": distance_to_logging(pages, targets["candidate"])}


def find_champion(path: str | Path | None) -> tuple[Path | None, str]:
    """The champion bundle to value: the given path, else the registry's, else none (why)."""
    if path:
        return Path(path), "given"
    from keyart import registry  # MLflow: only when no bundle is given

    try:
        found = registry.champion_bundle_path()
    except Exception as exc:  # a missing or empty registry must not fail evaluation
        return None, f"registry lookup failed: {exc}"
    return (Path(found), "registry") if found else (None, "no champion registered")


@dataclass
class HeldOut:
    """The impressions a run values its policies on.

    ``day`` is the held-out labelled day; on a cold start (``cold_start``) only its late part
    (the model trained on the early part). ``rows`` holds the candidate rows in ``pages``
    order (``PAGE_COLUMNS``), ``X`` their feature matrix.
    """

    day: str
    cold_start: bool
    pages: LoggedPages
    rows: pd.DataFrame
    X: np.ndarray

    @property
    def part(self) -> str:
        """``late`` on a cold start, else ``all`` (evaluation.json's ``heldout_part``)."""
        return "late" if self.cold_start else "all"


def load_heldout(lake: Lake, ds: str, run_dir: Path | None = None) -> HeldOut:
    """The held-out impressions of the run for ``ds`` (its ``train.json`` tells a cold start)."""
    run_dir = Path(run_dir) if run_dir else lake.run_dir(ds)
    day = heldout_day(lake, ds)
    files = sorted(lake.training(day).glob("*.parquet"))
    logged = ["logging_probability"] if files and "logging_probability" in pq.read_schema(files[0]).names else []
    table = read_training(lake, [day], columns=[*PAGE_COLUMNS, *logged, "features"])
    train_json = run_dir / "train.json"
    cold_start = train_json.exists() and json.loads(train_json.read_text()).get("cold_start_split", False)
    if cold_start:  # the model trained on the early part of this day: value the late part only
        table = time_split_rows(table, "heldout")
    frame = table.drop_columns(["features"]).to_pandas()
    frame["_row"] = np.arange(len(frame))
    pages, rows = pages_from_frame(frame)
    pages = replace(pages, logging=logged_probabilities(pages, rows))
    X = feature_array(table.column("features"))[rows["_row"].to_numpy()]
    return HeldOut(day=day, cold_start=bool(cold_start), pages=pages, rows=rows, X=X)


def evaluate_run(lake: Lake, ds: str, cfg: PolicyConfig, run_dir: Path | None = None,
                 champion_bundle: str | Path | None = None, n_boot: int = 200, seed: int = 0,
                 window_hours: float | None = None) -> dict[str, Any]:
    """Value the policies on the held-out day of ``ds``; write and return evaluation.json.
    ``window_hours``: the attribution window of serving's online priors (default: settings)."""
    window_hours = settings().attribution_window_hours if window_hours is None else window_hours
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir else lake.run_dir(ds)
    held = load_heldout(lake, ds, run_dir)
    day, pages, rows, X = held.day, held.pages, held.rows, held.X
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    booster = lgb.Booster(model_file=str(run_dir / "model.txt"))
    q_hat = booster.predict(X)
    scorers: dict[str, Callable[[], np.ndarray]] = {"candidate": lambda: q_hat}
    champion_path, why = find_champion(champion_bundle)
    champion_info: dict[str, Any] = {"source": why}
    champion_cfg = cfg
    if champion_path is not None:
        manifest = bundle.verify(champion_path)
        from keyart.scoring import OnnxScorer

        scorer = OnnxScorer(champion_path)
        scorers["champion"] = lambda: scorer.predict(X).astype(np.float64)
        champion_info.update(bundle=str(champion_path), bundle_version=manifest.version)
        if isinstance(manifest.get("policy"), dict):
            champion_cfg = PolicyConfig(**manifest["policy"])
    priors = online_priors(pages, rows, window_hours)
    targets = policy_targets(pages, rows, {"candidate": scorers["candidate"]}, cfg, seed, priors=priors)
    if "champion" in scorers:
        champion = policy_targets(pages, rows, {"champion": scorers["champion"]}, champion_cfg, seed,
                                  baselines=False, priors=priors)["champion"]
        targets["champion"], champion_info["served_share"] = as_served(pages, rows, champion, manifest.version)
    timings["score_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = evaluate_policies(pages, targets, q_hat=q_hat, bootstrap=Bootstrap(n_boot=n_boot, seed=seed),
                               replay_seed=seed,
                               differences=[("candidate", "champion")] if "champion" in targets else [])
    timings["ope_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    review = review_inputs(pages, rows, targets, q_hat, n_boot=n_boot, seed=seed)
    timings["review_s"] = time.perf_counter() - t0
    out = {"ds": ds, "heldout_ds": day, "heldout_part": held.part, "n_impressions": pages.n_impressions, "n_candidate_rows": pages.n_rows,
           "logging_policies": sorted(rows.loc[rows["is_logged"].astype(bool), "policy"].astype(str).unique().tolist()),
           "policy": asdict(cfg), "estimators": list(ESTIMATORS), "champion": champion_info,
           "bootstrap": {"n_boot": n_boot, "level": 0.95, "cluster": "member_id"},
           "logged_probabilities_share": float(pages.logged_known.mean()),
           "online_priors": {"window_hours": window_hours, "evidence": "closed attribution windows"},
           "weights": weight_diagnostics(pages, targets),
           **to_json(result), **review, "timings": {k: round(v, 3) for k, v in timings.items()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "evaluation.json.tmp"
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True))
    tmp.replace(run_dir / "evaluation.json")
    return out


def summary_table(evaluation: dict[str, Any]) -> str:
    """Take rate per policy and estimator, with intervals, as text."""
    lines = [f"held-out day {evaluation['heldout_ds']}: {evaluation['n_impressions']} impressions",
             f"{'policy':<14}" + "".join(f"{e:>26}" for e in evaluation["estimators"])]
    for policy, by_est in evaluation["policies"].items():
        cells = [f"{by_est[e]['estimate']:.4f} [{by_est[e]['lo']:.4f}, {by_est[e]['hi']:.4f}]"
                 if e in by_est else "-" for e in evaluation["estimators"]]
        lines.append(f"{policy:<14}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, type=fmt_ds, help="run date YYYY-MM-DD")
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <lake>/runs/ds=D")
    parser.add_argument("--champion-bundle", type=Path, default=None,
                        help="bundle to value as champion (default: the registry's champion, if any)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    s = settings()
    out = evaluate_run(Lake(args.lake or s.lake), args.ds, PolicyConfig.from_settings(s), run_dir=args.run_dir,
                       champion_bundle=args.champion_bundle, n_boot=args.n_boot, seed=args.seed)
    print(summary_table(out))
    return 0
