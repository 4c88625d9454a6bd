"""``keyart bench learning --days N``: the learning benchmark over days of its own logs.

For every world seed: build a world (``--history-days`` of viewing history), serve day 0
uniformly at random, then for each day k = 1 .. N - 1

1. train the reward model exactly as ``keyart train --ds <day k-1>`` does (window,
   exploration horizon, weighting, tree count and refit from the settings);
2. value on fresh visits of day k, from ground truth, with the snapshot and priors of day
   k - 1: contextual greedy, the configured exploring policy, the non-contextual policy
   (``beta_ts``), random, each title's default artwork and the oracle; and, for the
   requested ``--variants``, the same policies with another blend (``blend``: greedy and the
   exploring policy at ``prior_blend_n0`` 0, 10, 50 and at the n0 :func:`fit_blend_n0` fits
   to the model's held-out day; ``residual``: greedy and the exploring
   policy with the other ``prior_blend`` rule, mix or residual) or a model trained another way on the
   same logs (``weighting``: none / sqrt / clipped; ``refit``: without the refit;
   ``horizon``: without the exploration horizon);
3. serve day k with the configured policy on that model (decided in-process with
   :func:`keyart.policy.probabilities` and :func:`keyart.policy.draw`, logged with their
   propensities) and run the Spark jobs ingest -> rewards -> features -> priors for it.

Served lift capture is the traffic's own (every served impression valued from ground
truth). Serving's within-day online prior updates are not simulated: this measures what
the daily batch learns; ``keyart bench loop`` measures the product end to end.

``--scramble-tags`` permutes the artwork tags within each title in what keyart sees (the
lake's catalog and the feature rows) while the ground truth keeps the real ones: a
catalog whose tags the model cannot use, where only per-artwork evidence (the priors and
the model's prior inputs) finds each title's best artwork.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from keyart.lake import Lake, shift_ds

BLEND_FIT_MIN_ROWS = 1000
"""Shown impressions a blend fit needs; with fewer, :func:`fit_blend_n0` keeps the setting."""
BLEND_FIT_MIN_ARTWORKS = 20
"""Artworks with shown impressions a blend fit needs."""
BLEND_FIT_MAX_N0 = 100_000.0
"""The fitted ``prior_blend_n0`` when the model's per-artwork level is within noise of every
artwork's outcomes (an estimated between-artwork variance of 0 or less): the record then
corrects an artwork only once it has this many effective impressions."""
BLEND_FIT_MIN_N0 = 1.0
"""The smallest fitted ``prior_blend_n0`` (0 would mean "no blend", the opposite)."""


def fit_blend_n0(reward: np.ndarray, score: np.ndarray, keys: np.ndarray, fallback: float) -> dict[str, Any]:
    """The ``residual`` blend's ``prior_blend_n0`` fitted to held-out outcomes (empirical Bayes):
    a candidate for choosing n0 per model instead of one setting for every catalog, valued by
    ``--variants blend`` (the ``n0=fit`` rows). Not used by the product: on a catalog whose tags
    mislead the model it picked a larger n0 than 50 and lost to it (docs/benchmarks.md, "A
    blend weight fitted per model").

    Under ``residual`` an artwork's level is (n0 * model_mean + n * record) / (n0 + n): the
    posterior mean when the model's level is a prior with variance tau^2 around the artwork's
    true rate and each of the record's n impressions has variance sigma^2 = p (1 - p), so the
    n0 that weighs them as their errors say is sigma^2 / tau^2. Both are measured here on
    impressions the model was not trained on: ``reward`` [m] the outcome of each shown
    impression, ``score`` [m] the model's score of what was shown, ``keys`` [m] its artwork.
    Per artwork the mean residual r_a = mean(reward - score) over its n_a impressions has
    E[r_a^2] = b_a^2 + v_a, with b_a the model's error on the artwork and v_a = sum(score (1 -
    score)) / n_a^2 the outcomes' noise; tau^2 = sum n_a (r_a^2 - v_a) / sum n_a (the model's
    error where impressions are, uncentred: a model off in level everywhere is off on every
    artwork) and sigma^2 = mean(score (1 - score)).

    A model whose per-artwork levels are within noise of the outcomes (tau^2 <= 0) gets
    :data:`BLEND_FIT_MAX_N0`; one far off gets small n0 (the records take over after a few
    impressions), never below :data:`BLEND_FIT_MIN_N0`. With fewer than
    :data:`BLEND_FIT_MIN_ROWS` impressions or :data:`BLEND_FIT_MIN_ARTWORKS` artworks the
    result keeps ``fallback`` (``source`` "setting"). Returns ``n0``, ``source`` ("fitted" or
    "setting"), ``tau2``, ``sigma2``, ``rows``, ``artworks``.
    """
    reward = np.asarray(reward, dtype=np.float64)
    score = np.clip(np.asarray(score, dtype=np.float64), 0.0, 1.0)
    if reward.shape != score.shape or len(keys) != len(score):
        raise ValueError(f"reward, score and keys must have one value per impression, got "
                         f"{reward.shape}, {score.shape}, {len(keys)}")
    ok = np.isfinite(reward) & np.isfinite(score)
    reward, score, keys = reward[ok], score[ok], np.asarray(keys)[ok]
    out: dict[str, Any] = {"rows": int(len(score)), "artworks": 0, "tau2": None, "sigma2": None,
                           "n0": float(fallback), "source": "setting"}
    if len(score) == 0:
        return out
    _, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = np.bincount(inverse).astype(np.float64)
    out["artworks"] = int(len(n))
    if len(score) < BLEND_FIT_MIN_ROWS or len(n) < BLEND_FIT_MIN_ARTWORKS:
        return out
    var = score * (1.0 - score)
    r = np.bincount(inverse, weights=reward - score) / n
    v = np.bincount(inverse, weights=var) / n**2
    tau2 = float(np.sum(n * (r * r - v)) / np.sum(n))
    sigma2 = float(var.mean())
    n0 = BLEND_FIT_MAX_N0 if tau2 <= 0 else float(np.clip(sigma2 / tau2, BLEND_FIT_MIN_N0, BLEND_FIT_MAX_N0))
    out.update(tau2=tau2, sigma2=sigma2, n0=n0, source="fitted")
    return out


VARIANTS = ("blend", "residual", "weighting", "refit", "horizon")
BLENDS = (0.0, 10.0, 50.0)


class PolicyChooser:
    """Decides every slot of a day's visits with the policy on a reward model; traffic logs them."""

    logs_impressions = False

    def __init__(self, booster, lake: Lake, prior_ds: str, cfg, name: str = "keyart"):
        self.booster, self.lake, self.prior_ds, self.cfg, self.name = booster, lake, prior_ds, cfg, name

    def choose(self, world, visits, rng: np.random.Generator):
        from keyart.bench.learning_data import visit_rows
        from keyart.policy import draw, probabilities, residual_means
        from keyart.sim.choosers import Decisions

        rows = visit_rows(world, visits, self.lake, self.prior_ds)
        q = self.booster.predict(rows.X)
        p = probabilities(self.cfg, q, rows.offsets, rows.prior_alpha, rows.prior_beta, rows.prior_n, rng=rng,
                          model_mean=residual_means(self.cfg, q, visits.candidates[visits.candidates >= 0]))
        idx, prop = draw(p, rows.offsets, rng)
        art = visits.candidates[visits.candidates >= 0][idx]
        v, s = visits.titles.shape
        day = visits.ds.replace("-", "")
        ids = np.array([f"{self.name}-{day}-{i:06d}-{j:02d}" for i in range(v) for j in range(s)], dtype=object)
        return Decisions(artwork_idx=art.reshape(v, s), propensity=prop.reshape(v, s), event_id=ids.reshape(v, s),
                         model_version=np.full(v, f"bench-{self.prior_ds}", dtype=object),
                         policy=np.full(v, self.cfg.name, dtype=object))


def scramble_tags(world, seed: int) -> None:
    """Permute artwork tags within each title in what keyart sees (the truth keeps the real ones)."""
    cat = world.catalog
    rng = np.random.default_rng([seed, 99])
    tags = list(cat.art_tags)
    for t in range(cat.n_titles):
        rows = np.flatnonzero(cat.art_title == t)
        perm = rng.permutation(rows)
        for dst, src in zip(rows.tolist(), perm.tolist(), strict=True):
            tags[dst] = cat.art_tags[src]
    world.catalog = dataclasses.replace(cat, art_tags=tags)


def _values(world, visits, rows, q: np.ndarray, base, rng_seed: int, blends: bool,
            residual: bool = False, fitted_n0: float | None = None) -> dict[str, float]:
    from keyart.policy import probabilities, residual_means

    prior = (rows.prior_alpha, rows.prior_beta, rows.prior_n)
    art = visits.candidates[visits.candidates >= 0]

    def value(cfg, scores) -> float:
        p = probabilities(cfg, scores, rows.offsets, *prior, rng=np.random.default_rng(rng_seed),
                          model_mean=residual_means(cfg, scores, art))
        return world.expected_value_of_probs(visits, rows.to_vpk(p, visits.candidates))

    out = {"random": world.random_value(visits),
           "default artwork": world.expected_value(visits, world.default_choice(visits)),
           "oracle": world.expected_value(visits, world.oracle_choice(visits)),
           "noncontextual (beta_ts)": value(replace(base, name="beta_ts"), np.zeros_like(q)),
           "greedy": value(replace(base, name="greedy"), q),
           base.name: value(base, q)}
    if blends:
        for n0 in BLENDS:
            out[f"greedy n0={n0:g}"] = value(replace(base, name="greedy", prior_blend_n0=n0), q)
            out[f"{base.name} n0={n0:g}"] = value(replace(base, prior_blend_n0=n0), q)
        if fitted_n0 is not None:
            out["greedy n0=fit"] = value(replace(base, name="greedy", prior_blend_n0=fitted_n0), q)
            out[f"{base.name} n0=fit"] = value(replace(base, prior_blend_n0=fitted_n0), q)
    if residual:
        other = "mix" if base.prior_blend == "residual" else "residual"
        out[f"greedy blend={other}"] = value(replace(base, name="greedy", prior_blend=other), q)
        out[f"{base.name} blend={other}"] = value(replace(base, prior_blend=other), q)
    return out


def _blend_fit(lake: Lake, ds: str, booster, base) -> dict[str, Any]:
    """:func:`fit_blend_n0` of ``booster`` on the shown impressions of the held-out day of the
    run for ``ds`` (the model was not trained on them)."""
    from keyart.models.evaluate import load_heldout

    held = load_heldout(lake, ds, lake.root / "bench-runs" / f"ds={ds}" / "model")
    shown = held.pages.logged_row
    return fit_blend_n0(held.pages.reward, booster.predict(held.X[shown]),
                        held.rows["artwork_id"].astype(str).to_numpy()[shown], base.prior_blend_n0)


def _capture(values: dict[str, float]) -> dict[str, float]:
    lo, hi = values["random"], values["oracle"]
    return {k: (v - lo) / (hi - lo) for k, v in values.items()}


def run_seed(spark, settings, seed: int, workdir: Path, days: int, n_visits: int, eval_visits: int,
             history_days: int, variants: tuple[str, ...], scramble: bool, log=print) -> dict[str, Any]:
    import lightgbm as lgb

    from keyart.bench.learning_data import visit_rows
    from keyart.jobs import features as features_job
    from keyart.jobs import ingest, priors, rewards
    from keyart.jobs.common import run_job
    from keyart.models.reward_model import WEIGHTINGS, TrainConfig
    from keyart.models.train import train_config, train_run
    from keyart.policy import PolicyConfig
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    world = World.build(seed=seed, n_titles=settings.sim_titles, n_members=settings.sim_members,
                        history_days=history_days)
    if scramble:
        scramble_tags(world, seed)
    lake = Lake(workdir / f"seed={seed}")
    world.save(lake.root)
    base = PolicyConfig.from_settings(settings)
    window = settings.training_window_days

    def jobs(day: str, ingest_from: str | None = None) -> None:
        """The day's Spark jobs; ``ingest_from`` ingests every day from there (the history) too."""
        for module, first in ((ingest, ingest_from or day), (rewards, day), (features_job, day), (priors, day)):
            args = argparse.Namespace(ds=first, through=day if first != day else None, lake=str(lake.root),
                                      master=None, shuffle_partitions=None)
            run_job(module.__name__.rsplit(".", 1)[-1], module.run, args, spark=spark)

    def model(ds: str, cfg: TrainConfig, horizon: int | None = None, name: str = "model"):
        run_dir = lake.root / "bench-runs" / f"ds={ds}" / name
        info = train_run(lake, ds, window, cfg=cfg, run_dir=run_dir, exploration_horizon_days=horizon)
        return lgb.Booster(model_file=str(run_dir / "model.txt")), info

    day0 = world.config.start
    t0 = time.perf_counter()
    traffic = simulate_day(world, day0, RandomChooser(), visits=n_visits, seed=seed, lake_root=lake.root)
    if not any(lake.priors(day0).glob("*.parquet")):  # a rerun on the same workdir reuses day 0
        jobs(day0, ingest_from=shift_ds(day0, -history_days))
    per_day: list[dict[str, Any]] = [{"day": 0, "ds": day0, "served_by": "random",
                                      "served": _capture(traffic["expected_take_rate"])["served"]}]
    log(f"seed {seed} day 0 done in {time.perf_counter() - t0:.0f}s")
    for k in range(1, days):
        t0 = time.perf_counter()
        prev, ds = shift_ds(day0, k - 1), shift_ds(day0, k)
        cfg = train_config(settings)
        booster, info = model(prev, cfg)
        visits = world.visits(ds, eval_visits, seed=seed * 1000 + 500 + k)
        rows = visit_rows(world, visits, lake, prev)
        q = booster.predict(rows.X)
        fit = _blend_fit(lake, prev, booster, base) if "blend" in variants else None
        values = _values(world, visits, rows, q, base, seed + k, "blend" in variants, "residual" in variants,
                         fitted_n0=fit["n0"] if fit else None)
        trained = {"trees": info["best_iteration"], "stopped_at": info.get("early_stopping_iteration"),
                   "rows": info["rows"], "valid_auc": info["metrics"]["valid"]["auc"],
                   "exploration_impressions": info["window"].get("exploration_impressions")}
        others: list[tuple[str, TrainConfig, int | None]] = []
        if "weighting" in variants:
            others += [(f"greedy weighting={w}", replace(cfg, weighting=w), None) for w in WEIGHTINGS if w != cfg.weighting]
        if "refit" in variants:
            others.append(("greedy no refit", replace(cfg, refit=False), None))
        if "horizon" in variants:
            others.append(("greedy no exploration horizon", cfg, 0))
        for label, other_cfg, horizon in others:
            other, _ = model(prev, other_cfg, horizon, name=label.replace(" ", "_"))
            values[label] = _values(world, visits, rows, other.predict(rows.X), base, seed + k, False)["greedy"]
        chooser = PolicyChooser(booster, lake, prev, base)
        traffic = simulate_day(world, ds, chooser, visits=n_visits, seed=seed, lake_root=lake.root)
        jobs(ds)
        day = {"day": k, "ds": ds, "served_by": f"model of {prev}", "served": _capture(traffic["expected_take_rate"])["served"],
               "lift_capture": _capture(values), "take_rate": values, "model": trained, "blend_fit": fit,
               "seconds": round(time.perf_counter() - t0, 1)}
        per_day.append(day)
        log(f"seed {seed} day {k}: greedy {day['lift_capture']['greedy']:.3f}, "
            f"{base.name} {day['lift_capture'][base.name]:.3f}, served {day['served']:.3f}, "
            f"beta_ts {day['lift_capture']['noncontextual (beta_ts)']:.3f}"
            + (f", fitted n0 {fit['n0']:.4g} ({fit['source']})" if fit else "") + f" ({day['seconds']}s)")
    return {"seed": seed, "days": per_day, "lake": str(lake.root)}


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean lift capture per day and policy over seeds, and the mean day-to-day change of greedy."""
    n_days = min(len(s["days"]) for s in seeds)
    table: dict[str, list[float | None]] = {}
    for k in range(1, n_days):
        keys = set.intersection(*(set(s["days"][k]["lift_capture"]) for s in seeds))
        for key in sorted(keys):
            table.setdefault(key, [None] * n_days)[k] = float(np.mean([s["days"][k]["lift_capture"][key] for s in seeds]))
    table["served"] = [float(np.mean([s["days"][k]["served"] for s in seeds])) for k in range(n_days)]
    greedy = np.array([[s["days"][k]["lift_capture"]["greedy"] for k in range(1, n_days)] for s in seeds])
    steps = np.diff(greedy, axis=1)
    return {"mean_lift_capture": table,
            "greedy_day_to_day_change": {"mean": float(steps.mean()) if steps.size else None,
                                         "per_seed_mean": steps.mean(axis=1).tolist() if steps.size else [],
                                         "share_of_steps_down": float((steps < 0).mean()) if steps.size else None}}


def format_loop(result: dict[str, Any]) -> str:
    s = result["summary"]["mean_lift_capture"]
    n_days = len(s["served"])
    lines = [f"lift capture, mean over world seeds {[r['seed'] for r in result['seeds']]} "
             f"({result['visits']} visits/day, eval {result['eval_visits']} visits/day"
             f"{', tags scrambled' if result['scramble_tags'] else ''})",
             f"{'policy':<36}" + "".join(f"{'day ' + str(k):>9}" for k in range(n_days))]
    for key, vals in s.items():
        lines.append(f"{key:<36}" + "".join(f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in vals))
    ch = result["summary"]["greedy_day_to_day_change"]
    lines.append(f"\ngreedy day-to-day change: mean {ch['mean']:+.4f}, per seed {[round(x, 4) for x in ch['per_seed_mean']]}, "
                 f"share of steps down {ch['share_of_steps_down']:.2f}")
    return "\n".join(lines)


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    from keyart.config import settings
    from keyart.jobs.common import get_spark
    from keyart.policy import PolicyConfig

    s = settings()
    variants = tuple(v for v in (args.variants or "").split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="keyart-bench-learning-loop-"))
    first = args.world_seed if args.world_seed is not None else s.sim_seed
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = get_spark("keyart-bench-learning-loop", master="local[2]", shuffle_partitions=4, ui=False)
    try:
        seeds = [run_seed(spark, s, first + i, workdir, args.days, args.visits or s.sim_visits_per_day,
                          args.eval_visits, args.history_days, variants, args.scramble_tags,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
                 for i in range(args.world_seeds)]
    finally:
        spark.stop()
    return {"days": args.days, "visits": args.visits or s.sim_visits_per_day, "eval_visits": args.eval_visits,
            "history_days": args.history_days, "variants": list(variants), "scramble_tags": args.scramble_tags,
            "policy": dataclasses.asdict(PolicyConfig.from_settings(s)),
            "train_weighting": s.train_weighting, "training_window_days": s.training_window_days,
            "training_exploration_horizon_days": s.training_exploration_horizon_days,
            "prior_half_life_days": s.prior_half_life_days, "prior_max_ess": s.prior_max_ess,
            "seeds": seeds, "summary": summarise(seeds), "workdir": str(workdir)}
