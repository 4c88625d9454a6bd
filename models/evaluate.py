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
from keyart.policy import PolicyConfig, probabilities

log = logging.getLogger(__name__)
BASELINES = ("random", "noncontextual")


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
    out = {name: probabilities(cfg, score(), pages.offsets, a, b, n, rng) for name, score in scorers.items()}
    if not baselines:
        return out
    zeros = np.zeros(pages.n_rows)
    out["random"] = probabilities(replace(cfg, name="random"), zeros, pages.offsets, a, b, n)
    out["noncontextual"] = probabilities(replace(cfg, name="beta_ts"), zeros, pages.offsets, a, b, n, rng)
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
    out = {"ds": ds, "heldout_ds": day, "heldout_part": held.part, "n_impressions": pages.n_impressions, "n_candidate_rows": pages.n_rows,
           "logging_policies": sorted(rows.loc[rows["is_logged"].astype(bool), "policy"].astype(str).unique().tolist()),
           "policy": asdict(cfg), "estimators": list(ESTIMATORS), "champion": champion_info,
           "bootstrap": {"n_boot": n_boot, "level": 0.95, "cluster": "member_id"},
           "logged_probabilities_share": float(pages.logged_known.mean()),
           "online_priors": {"window_hours": window_hours, "evidence": "closed attribution windows"},
           "weights": weight_diagnostics(pages, targets),
           **to_json(result), "timings": {k: round(v, 3) for k, v in timings.items()}}
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
