"""``keyart bench learning``: how much of the oracle's lift the learned policies capture,
and how often the offline estimators' intervals cover the truth.

1. Build the default simulated world; log two days of uniform-random traffic and label
   them with the Spark jobs (:mod:`keyart.bench.learning_data`). The first day only warms
   up the Beta priors: training rows carry the priors of the day before the impression,
   as in steady state, so without it the model could not learn what the priors say.
2. Train the reward model on the second day's impressions alone (>= 200k; rows labelled
   on that day and the next) (:mod:`keyart.models.reward_model`).
3. On fresh visits of the next day, value from ground truth (exact expected take rate,
   no sampling of plays) random, non-contextual (beta_ts on the priors), contextual
   greedy, the exploring policies over a small grid, and the oracle. Lift capture =
   (V - V_random) / (V_oracle - V_random). As a diagnostic, greedy on a model fit to the
   ground truth of every candidate (no label noise): the ceiling of the features.
4. Coverage: split the fresh visits into ``--seeds`` disjoint parts; in each, draw
   uniform-random logs and Bernoulli rewards from the ground truth, run replay / IPS /
   SNIPS / DR (95% bootstrap intervals) for greedy, the default exploring policy and the
   non-contextual policy, and count how often each interval holds the part's true value.

With ``--days N`` (N > 1) it runs over days of its own logs instead
(:mod:`keyart.bench.learning_loop`): each day's model trained as ``keyart train`` does, valued
on the next day and serving it.

This is a benchmark, not a test: it prints figures (``--json`` for JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from keyart.bench.learning_data import (
    SlotRows,
    ensure_path,
    simulate_and_label,
    visit_rows,
)
from keyart.config import settings
from keyart.lake import Lake, shift_ds
from keyart.models.reward_model import TrainConfig, train_reward_model
from keyart.ope import ESTIMATORS, Bootstrap, LoggedPages, evaluate_policies
from keyart.policy import PolicyConfig, probabilities, residual_means

GRID: tuple[tuple[str, dict[str, float | str]], ...] = (
    ("squarecb", {"gamma": 10.0}), ("squarecb", {"gamma": 30.0}), ("squarecb", {"gamma": 100.0}),
    ("squarecb", {"gamma": 300.0}), ("squarecb", {"gap_unit": "score", "gamma": 3000.0}),
    ("squarecb", {"prior_blend_n0": 0.0}), ("squarecb", {"prior_blend_n0": 10.0}),
    ("squarecb", {"prior_blend_n0": 50.0}),
    ("thompson", {}), ("egreedy", {"epsilon": 0.1}), ("egreedy", {"epsilon": 0.05}),
    ("squarecb", {"floor": 0.005}), ("squarecb", {"floor": 0.002}), ("squarecb", {"floor": 0.0}),
    ("squarecb", {"gamma": 200.0}), ("squarecb", {"gamma": 200.0, "floor": 0.002}),
)


def _label(name: str, overrides: dict[str, float | str]) -> str:
    return name + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in overrides.items())


def train_on_logs(lake: Lake, ds: str):
    """Reward model trained on the impressions of day ``ds`` (labelled on ds and ds+1)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from keyart.lake import parse_ds
    from keyart.models.data import read_training
    from keyart.models.train import TRAIN_COLUMNS, logged_arrays

    table = read_training(lake, [ds, shift_ds(ds, 1)], columns=[*TRAIN_COLUMNS, "impression_ds"])
    table = table.filter(pc.equal(table.column("impression_ds"), pa.scalar(parse_ds(ds), pa.date32())))
    arrays = logged_arrays(table)
    return train_reward_model(cfg=TrainConfig(), **arrays), len(arrays["y"])


def feature_ceiling_scores(world, lake: Lake, ds: str, n_visits: int, seed: int, rows: SlotRows) -> np.ndarray:
    """Scores of ``rows`` from a LightGBM fit to the ground truth itself (diagnostic).

    Fresh visits of the logged day ``ds``, every candidate of every slot with its feature
    row as the training table would have it (snapshot and priors of ``ds - 1``) and, as its
    label, the exact expected quality play: no label noise and no unobserved arm. Greedy on
    these scores is what the feature specification allows at best; the learned model's
    distance to it is what the logs cost.
    """
    import lightgbm as lgb

    train_visits = world.visits(ds, n_visits, seed=seed + 5)
    train_rows = visit_rows(world, train_visits, lake, shift_ds(ds, -1))
    truth = world.candidate_values(train_visits)[train_visits.candidates >= 0]
    params = {"objective": "cross_entropy", "learning_rate": 0.1, "num_leaves": 31, "min_data_in_leaf": 100,
              "num_threads": 2, "seed": 7, "deterministic": True, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(train_rows.X, label=truth), num_boost_round=400)
    return booster.predict(rows.X)


def policy_values(world, visits, rows: SlotRows, q: np.ndarray, base: PolicyConfig,
                  q_ceiling: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Ground-truth take rate of every benchmarked policy on ``visits``."""
    rng = np.random.default_rng(0)
    prior = (rows.prior_alpha, rows.prior_beta, rows.prior_n)
    art = visits.candidates[visits.candidates >= 0]

    def value(cfg: PolicyConfig, scores: np.ndarray) -> float:
        p = probabilities(cfg, scores, rows.offsets, *prior, rng=rng, model_mean=residual_means(cfg, scores, art))
        return world.expected_value_of_probs(visits, rows.to_vpk(p, visits.candidates))

    zeros = np.zeros_like(q)
    out: dict[str, dict[str, Any]] = {
        "random": {"value": world.random_value(visits)},
        "noncontextual (beta_ts)": {"value": value(replace(base, name="beta_ts"), zeros)},
        "contextual greedy": {"value": value(replace(base, name="greedy"), q)},
        "contextual greedy, no prior blend": {"value": value(replace(base, name="greedy", prior_blend_n0=0.0), q)},
        "contextual greedy, residual blend": {"value": value(replace(base, name="greedy", prior_blend="residual"), q)},
        "contextual greedy, mix blend": {"value": value(replace(base, name="greedy", prior_blend="mix"), q)},
    }
    if q_ceiling is not None:
        out["greedy, model fit to truth (ceiling)"] = {"value": value(replace(base, name="greedy"), q_ceiling)}
    out[f"{base.name} (the settings)"] = {"value": value(base, q), "config": asdict(base)}
    for name, over in GRID:
        cfg = replace(base, name=name, **over)
        t0 = time.perf_counter()
        out[_label(name, over)] = {"value": value(cfg, q), "config": asdict(cfg),
                                   "seconds": round(time.perf_counter() - t0, 2)}
    out["oracle"] = {"value": world.expected_value(visits, world.oracle_choice(visits))}
    v_rand, v_orc = out["random"]["value"], out["oracle"]["value"]
    for fig in out.values():
        fig["lift_capture"] = (fig["value"] - v_rand) / (v_orc - v_rand)
    return out


def coverage(world, visits, rows: SlotRows, q: np.ndarray, base: PolicyConfig, seeds: int,
             n_boot: int) -> dict[str, dict[str, float]]:
    """Share of ``seeds`` uniform-logged parts whose 95% interval holds the true value."""
    targets_cfg = {"contextual greedy": replace(base, name="greedy"), base.name: base,
                   "noncontextual": replace(base, name="beta_ts")}
    parts = np.array_split(np.arange(visits.n_visits), seeds)
    p_slots = visits.titles.shape[1]
    hits = {(t, e): 0 for t in targets_cfg for e in ESTIMATORS}
    widths = {key: [] for key in hits}
    for seed, part in enumerate(parts):
        rng = np.random.default_rng(1000 + seed)
        sub = visits.subset(part)
        slots = (part[:, None] * p_slots + np.arange(p_slots)).reshape(-1)
        row_idx = np.concatenate([np.arange(rows.offsets[s], rows.offsets[s + 1]) for s in slots])
        k = np.diff(rows.offsets)[slots]
        offsets = np.r_[0, np.cumsum(k)]
        shown = offsets[:-1] + np.minimum((rng.random(len(k)) * k).astype(int), k - 1)
        truth_rows = world.candidate_values(sub)[sub.candidates >= 0]
        reward = (rng.random(len(k)) < truth_rows[shown]).astype(float)
        pages = LoggedPages(offsets, shown, reward, 1.0 / k, groups=np.repeat(part, p_slots))
        prior = (rows.prior_alpha[row_idx], rows.prior_beta[row_idx], rows.prior_n[row_idx])
        targets = {t: probabilities(cfg, q[row_idx], offsets, *prior, rng=rng) for t, cfg in targets_cfg.items()}
        result = evaluate_policies(pages, targets, q_hat=q[row_idx], bootstrap=Bootstrap(n_boot=n_boot, seed=seed),
                                   replay_seed=seed)["policies"]
        for t, p in targets.items():
            true_v = world.expected_value_of_probs(sub, rows.to_vpk(p, sub.candidates))
            for e in ESTIMATORS:
                iv = result[t][e]
                hits[(t, e)] += iv.covers(true_v)
                widths[(t, e)].append(iv.hi - iv.lo)
    out: dict[str, dict[str, float]] = {}
    for (t, e), h in hits.items():
        out.setdefault(t, {})[e] = h / len(parts)
        out[t][f"{e}_mean_width"] = float(np.mean(widths[(t, e)]))
    return out


def run_benchmark(workdir: Path, world_seed: int, n_visits: int, eval_visits: int, seeds: int,
                  n_boot: int, ceiling: bool = True, tag_vocabulary: str = "default") -> dict[str, Any]:
    from keyart.sim.world import World

    s = settings()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lake = Lake(workdir)
    if (lake.root / "sim" / "world.json").exists():
        world = World.load(lake.root)
    else:
        world = World.build(seed=world_seed, n_titles=s.sim_titles, n_members=s.sim_members,
                            tag_vocabulary=tag_vocabulary)
        world.save(lake.root)
    if world.config.tag_vocabulary != tag_vocabulary:
        raise ValueError(f"{lake.root} holds a world with the {world.config.tag_vocabulary!r} tag vocabulary, "
                         f"not {tag_vocabulary!r}: use another --workdir")
    warmup = world.config.start
    ds = shift_ds(warmup, 1)
    if not any(lake.training(shift_ds(ds, 1)).glob("*.parquet")):
        simulate_and_label(world, lake, [warmup, ds], n_visits, world_seed)
    timings["simulate_and_jobs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained, n_train = train_on_logs(lake, ds)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_day = shift_ds(ds, 1)
    visits = world.visits(eval_day, eval_visits, seed=world_seed + 1)
    rows = visit_rows(world, visits, lake, ds)
    q = trained.booster.predict(rows.X)
    timings["eval_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    q_ceiling = feature_ceiling_scores(world, lake, ds, n_visits, world_seed, rows) if ceiling else None
    timings["ceiling_s"] = time.perf_counter() - t0

    base = PolicyConfig.from_settings(s)
    t0 = time.perf_counter()
    values = policy_values(world, visits, rows, q, base, q_ceiling)
    timings["values_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cover = coverage(world, visits, rows, q, base, seeds, n_boot)
    timings["coverage_s"] = time.perf_counter() - t0
    return {"world_seed": world_seed, "tag_vocabulary": tag_vocabulary, "logged_day": ds, "train_impressions": n_train,
            "train_metrics": trained.metrics["valid"], "best_iteration": trained.info["best_iteration"], "eval_day": eval_day, "eval_impressions": visits.n_slots,
            "default_policy": asdict(base), "values": values, "coverage": cover,
            "coverage_impressions_per_seed": visits.n_slots // seeds, "seeds": seeds,
            "targets": {"greedy_lift_capture": 0.8, "coverage": 0.9},
            "timings": {k: round(v, 1) for k, v in timings.items()}, "workdir": str(lake.root)}


def format_table(r: dict[str, Any]) -> str:
    lines = [f"world seed {r['world_seed']} ({r.get('tag_vocabulary', 'default')} tag vocabulary): trained on {r['train_impressions']} uniform-random impressions "
             f"of {r['logged_day']} (valid AUC {r['train_metrics']['auc']:.3f}); "
             f"valued on {r['eval_impressions']} impressions of {r['eval_day']}",
             f"{'policy':<36}{'take rate':>10}{'lift capture':>14}"]
    for name, fig in r["values"].items():
        lines.append(f"{name:<36}{fig['value']:>10.4f}{fig['lift_capture']:>14.3f}")
    lines.append(f"\nOPE 95% interval coverage over {r['seeds']} seeds "
                 f"({r['coverage_impressions_per_seed']} uniform-logged impressions each)")
    lines.append(f"{'target':<20}" + "".join(f"{e:>16}" for e in ESTIMATORS))
    for t, by in r["coverage"].items():
        lines.append(f"{t:<20}" + "".join(f"{by[e]:>9.2f} ±{by[e + '_mean_width'] / 2:.3f}" for e in ESTIMATORS))
    lines.append(f"\ntimings (s): {r['timings']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="lake for the benchmark (reused if it already holds the world and logs)")
    parser.add_argument("--world-seed", type=int, default=None, help="default: sim_seed")
    parser.add_argument("--visits", type=int, default=None, help="logged visits (10 impressions each); default sim_visits_per_day")
    parser.add_argument("--eval-visits", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--tag-vocabulary", choices=("default", "unseen"), default="default",
                        help="the world's artwork tags: default, or unseen (other keys, values and flags; same truth)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the diagnostic model fit to ground truth (the feature ceiling)")
    loop = parser.add_argument_group("over days (--days N > 1: keyart.bench.learning_loop; --seeds is then unused)")
    loop.add_argument("--days", type=int, default=1, help="day 0 uniform, then days served by the model of the day before")
    loop.add_argument("--world-seeds", type=int, default=2, help="worlds (seeds world-seed, world-seed + 1, ...)")
    loop.add_argument("--history-days", type=int, default=90, help="viewing history of each world")
    loop.add_argument("--variants", default="",
                      help="comma-separated: blend, residual, weighting, refit, horizon (also valued on the same logs)")
    loop.add_argument("--scramble-tags", action="store_true",
                      help="permute artwork tags within each title in what keyart sees (truth keeps the real ones)")


def run(args: argparse.Namespace) -> int:
    if args.days > 1:
        from keyart.bench.learning_loop import format_loop, run_loop

        result = run_loop(args)
        print(json.dumps(result, indent=2, default=str) if args.json else format_loop(result))
        return 0
    s = settings()
    result = run_benchmark(ensure_path(args.workdir), args.world_seed if args.world_seed is not None else s.sim_seed,
                           args.visits or s.sim_visits_per_day, args.eval_visits, args.seeds, args.n_boot,
                           ceiling=not args.no_ceiling, tag_vocabulary=args.tag_vocabulary)
    print(json.dumps(result, indent=2, default=str) if args.json else format_table(result))
    return 0
