"""Offline evaluation of a run: value the policies on the held-out labelled day.

Policies valued (``evaluation.json`` keys):

``candidate``      the configured exploration policy on this run's model (model.txt)
``champion``       the same policy settings on the champion bundle's model.onnx
                   (``--champion-bundle``, else the registry's champion; skipped if none)
``logging``        what was actually served: its on-policy mean reward
``random``         uniform over the candidates
``noncontextual``  ``beta_ts`` on the Beta priors (per-title Thompson, no model)

Every policy's distribution is computed by :func:`keyart.policy.probabilities` from the
training table's candidate rows of the held-out day (the priors there are the ones
serving had), and valued with replay, IPS, SNIPS and DR (:mod:`keyart.ope`).
DR uses this run's model as q-hat for every policy, so the policies are compared on the
same footing; lifts are over the logging policy with paired bootstrap intervals, and
``difference.candidate_minus_champion`` is V_candidate - V_champion with a paired bootstrap
interval (what the promotion gate reads).
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

from keyart import bundle
from keyart.config import settings
from keyart.lake import Lake, fmt_ds
from keyart.models.data import (
    PAGE_COLUMNS,
    feature_array,
    heldout_day,
    pages_from_frame,
    read_training,
    time_split_rows,
)
from keyart.ope import ESTIMATORS, Bootstrap, LoggedPages, evaluate_policies, to_json
from keyart.policy import PolicyConfig, probabilities

log = logging.getLogger(__name__)
BASELINES = ("random", "noncontextual")


def policy_targets(pages: LoggedPages, rows, scorers: dict[str, Callable[[], np.ndarray]],
                   cfg: PolicyConfig, seed: int = 0, baselines: bool = True) -> dict[str, np.ndarray]:
    """Candidate-row probabilities [n_rows] of every policy.

    ``scorers`` maps a model-based policy name to a function returning its model scores
    [n_rows]; ``random`` and ``noncontextual`` are added if ``baselines``. ``rows`` holds the priors.
    """
    a = rows["prior_alpha"].to_numpy(dtype=np.float64)
    b = rows["prior_beta"].to_numpy(dtype=np.float64)
    n = rows["prior_n"].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = {name: probabilities(cfg, score(), pages.offsets, a, b, n, rng) for name, score in scorers.items()}
    if not baselines:
        return out
    zeros = np.zeros(pages.n_rows)
    out["random"] = probabilities(replace(cfg, name="random"), zeros, pages.offsets, a, b, n)
    out["noncontextual"] = probabilities(replace(cfg, name="beta_ts"), zeros, pages.offsets, a, b, n, rng)
    return out


def find_champion(path: str | Path | None) -> tuple[Path | None, str]:
    """The champion bundle to value: the given path, else the registry's, else none (why)."""
    if path:
        return Path(path), "given"
    try:
        from keyart.registry import champion_bundle_path
    except ImportError:
        return None, "no registry module"
    try:
        found = champion_bundle_path()
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
    table = read_training(lake, [day], columns=[*PAGE_COLUMNS, "features"])
    train_json = run_dir / "train.json"
    cold_start = train_json.exists() and json.loads(train_json.read_text()).get("cold_start_split", False)
    if cold_start:  # the model trained on the early part of this day: value the late part only
        table = time_split_rows(table, "heldout")
    frame = table.drop_columns(["features"]).to_pandas()
    frame["_row"] = np.arange(len(frame))
    pages, rows = pages_from_frame(frame)
    X = feature_array(table.column("features"))[rows["_row"].to_numpy()]
    return HeldOut(day=day, cold_start=bool(cold_start), pages=pages, rows=rows, X=X)


def evaluate_run(lake: Lake, ds: str, cfg: PolicyConfig, run_dir: Path | None = None,
                 champion_bundle: str | Path | None = None, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Value the policies on the held-out day of ``ds``; write and return evaluation.json."""
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
    targets = policy_targets(pages, rows, {"candidate": scorers["candidate"]}, cfg, seed)
    if "champion" in scorers:
        targets.update(policy_targets(pages, rows, {"champion": scorers["champion"]}, champion_cfg, seed,
                                      baselines=False))
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
