"""``keyart bench loop``: the closed loop over simulated days, keyart against three baselines.

For every seed a world is built (the seed is the world's, the visits' and the arms'), its
90-day viewing history is ingested, and for each day every arm decides exactly the same
visits (``world.visits(ds, n, seed)``):

``keyart``         day 0 uniform random, logged to the lake; day k >= 1 the DAG's batch steps
                   for day k - 1 run in-process and day k is served by the new bundle
                   through serving's ``Service`` (:mod:`keyart.bench.loop_keyart`);
``random``         uniform over the candidates (valued exactly);
``noncontextual``  Beta-Thompson per (title, artwork), online per event;
``vw``             Vowpal Wabbit ``--cb_explore_adf --squarecb``, online per event
                   (:mod:`keyart.bench.loop_arms`).

Per day and arm: the expected take rate of the arm's decisions from the ground truth, the
lift capture (V - V_random) / (V_oracle - V_random) and the cumulative regret against the
oracle in expected quality plays; mean, min and max over seeds. ``--json`` prints the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("keyart", "random", "noncontextual", "vw")
GOAL_FROM_DAY = 3
DEFAULTS = {"days": 7, "seeds": 3, "visits": 6000, "titles": 200, "members": 20000}
QUICK = {"days": 3, "seeds": 1, "visits": 1500, "titles": 40, "members": 2000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=None, help=f"days including day 0 (default {DEFAULTS['days']})")
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {DEFAULTS['seeds']})")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: config sim_seed)")
    parser.add_argument("--visits", type=int, default=None, help=f"visits per day, 10 titles each (default {DEFAULTS['visits']})")
    parser.add_argument("--titles", type=int, default=None, help=f"catalog size (default {DEFAULTS['titles']})")
    parser.add_argument("--members", type=int, default=None, help=f"members (default {DEFAULTS['members']})")
    parser.add_argument("--start", default="2026-11-01", help="day 0")
    parser.add_argument("--vw-args", default=None, help="Vowpal Wabbit command line (default: keyart.bench.loop_arms.VW_ARGS)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--workdir", type=Path, default=None, help="where the lakes go (default: a temporary folder, removed)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def sizes(args: argparse.Namespace) -> dict[str, int]:
    base = QUICK if args.quick else DEFAULTS
    return {k: int(getattr(args, k)) if getattr(args, k) is not None else v for k, v in base.items()}


def run_seed(spark, settings, seed: int, size: dict[str, int], start: str, workdir: Path,
             vw_args: str, log) -> dict[str, Any]:
    """All arms over all days for one seed."""
    from dataclasses import replace

    from keyart.bench.loop_arms import NonContextualArm, VWArm
    from keyart.bench.loop_keyart import KeyartPipeline, ServiceChooser
    from keyart.lake import Lake, shift_ds
    from keyart.policy import PolicyConfig
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    t_seed = time.perf_counter()
    timings: dict[str, float] = {}
    lake = Lake(workdir / f"seed-{seed}")
    shutil.rmtree(lake.root, ignore_errors=True)
    t0 = time.perf_counter()
    world = World.build(seed=seed, n_titles=size["titles"], n_members=size["members"], start=start)
    world.save(lake.root)
    timings["world_s"] = time.perf_counter() - t0
    pipe = KeyartPipeline(spark, lake, settings)
    t0 = time.perf_counter()
    pipe.ingest_history(shift_ds(start, -world.config.history_days), shift_ds(start, -1))
    affinity = pipe.history_affinity(shift_ds(start, -1), world.members.member_ids)
    timings["history_s"] = time.perf_counter() - t0
    # beta_ts with keyart's configured floor; 256 samples per propensity estimate keeps it fast
    nc_cfg = replace(PolicyConfig.from_settings(settings), name="beta_ts", thompson_samples=256)
    nc = NonContextualArm(world.catalog.n_artworks, nc_cfg, seed=seed)
    vw = VWArm(world, affinity, args=vw_args, seed=seed)
    days: list[dict[str, Any]] = []
    timings.update(keyart_decide_s=0.0, noncontextual_s=0.0, vw_s=0.0)
    try:
        for k in range(size["days"]):
            ds = shift_ds(start, k)
            visits = world.visits(ds, size["visits"], seed)
            values = world.candidate_values(visits)
            model: dict[str, Any] = {"version": "random"}
            if k == 0:
                chooser = RandomChooser()
            else:
                log(f"seed {seed} day {k} {ds}: batch steps for {shift_ds(ds, -1)}")
                pipe.batch(shift_ds(ds, -1))
                model = pipe.train_and_export(shift_ds(ds, -1))
                chooser = ServiceChooser(pipe.service(model["bundle"]), lake)
            log(f"seed {seed} day {k} {ds}: serving {visits.n_visits} visits (keyart {model['version']})")
            t0 = time.perf_counter()
            summary = simulate_day(world, ds, chooser, visits=visits, seed=seed, lake_root=lake.root,
                                   attribution_window_hours=settings.attribution_window_hours)
            timings["keyart_decide_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            nc_day = nc.run_day(world, visits, values)
            timings["noncontextual_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            vw_day = vw.run_day(world, visits, values)
            timings["vw_s"] += time.perf_counter() - t0
            truth = summary["expected_take_rate"]
            days.append({
                "day": k, "ds": ds, "impressions": visits.n_slots,
                "oracle": truth["oracle"],
                "value": {"keyart": truth["served"], "random": truth["random"],
                          "noncontextual": world.expected_value(visits, nc_day.artwork_idx),
                          "vw": world.expected_value(visits, vw_day.artwork_idx)},
                "observed_take_rate": {"keyart": summary["observed_take_rate"],
                                       "noncontextual": float(nc_day.reward.mean()), "vw": float(vw_day.reward.mean())},
                "keyart_model": model,
            })
    finally:
        vw.close()
    timings.update({f"keyart_{k}_s": v for k, v in pipe.timings.items()})
    timings["total_s"] = time.perf_counter() - t_seed
    return {"seed": seed, "days": days, "timings": {k: round(v, 1) for k, v in timings.items()}}


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per day and arm: take rate, lift capture and cumulative regret, mean/min/max over seeds."""
    from keyart.bench.loop_arms import lift_capture, summarize

    regret = {(s["seed"], arm): 0.0 for s in per_seed for arm in ARMS}
    rows = []
    for k in range(len(per_seed[0]["days"])):
        per_arm: dict[str, dict[str, list[float]]] = {arm: {"value": [], "lift": [], "regret": []} for arm in ARMS}
        oracle = []
        for s in per_seed:
            d = s["days"][k]
            oracle.append(d["oracle"])
            for arm in ARMS:
                v = d["value"][arm]
                regret[(s["seed"], arm)] += (d["oracle"] - v) * d["impressions"]
                per_arm[arm]["value"].append(v)
                per_arm[arm]["lift"].append(lift_capture(v, d["value"]["random"], d["oracle"]))
                per_arm[arm]["regret"].append(regret[(s["seed"], arm)])
        rows.append({
            "day": k, "ds": per_seed[0]["days"][k]["ds"], "oracle": summarize(oracle),
            "arms": {arm: {"take_rate": summarize(f["value"]), "lift_capture": summarize(f["lift"]),
                           "cumulative_regret": summarize(f["regret"])} for arm, f in per_arm.items()},
        })
    return rows


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """keyart's mean lift capture >= VW's on every day from GOAL_FROM_DAY on."""
    days = {r["day"]: r["arms"]["keyart"]["lift_capture"]["mean"] - r["arms"]["vw"]["lift_capture"]["mean"]
            for r in rows if r["day"] >= GOAL_FROM_DAY}
    return {"statement": f"keyart lift capture >= vw lift capture from day {GOAL_FROM_DAY} on (mean over seeds)",
            "keyart_minus_vw_by_day": days, "met": all(x >= 0 for x in days.values()) if days else None}


def _mm(s: dict[str, float], fmt: str) -> str:
    return f"{format(s['mean'], fmt)} [{format(s['min'], fmt)}, {format(s['max'], fmt)}]"


def format_tables(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"keyart bench loop: {c['days']} days x {c['seeds']} seeds (seeds {', '.join(map(str, c['seed_list']))}); "
             f"{c['visits']} visits/day x 10 titles = {c['impressions_per_day']} impressions/day per arm; "
             f"{c['titles']} titles, {c['members']} members; vw: {c['vw_args']}",
             "", "Expected take rate (quality plays per impression, ground truth), mean over seeds",
             f"{'day':<4}{'ds':<12}{'oracle':>9}" + "".join(f"{a:>15}" for a in ARMS)]
    for row in r["days"]:
        lines.append(f"{row['day']:<4}{row['ds']:<12}{row['oracle']['mean']:>9.4f}"
                     + "".join(f"{row['arms'][a]['take_rate']['mean']:>15.4f}" for a in ARMS))
    lines += ["", "Lift capture (V - V_random) / (V_oracle - V_random): mean [min, max] over seeds",
              f"{'day':<4}" + "".join(f"{a:>22}" for a in ARMS if a != "random")]
    for row in r["days"]:
        lines.append(f"{row['day']:<4}" + "".join(f"{_mm(row['arms'][a]['lift_capture'], '.3f'):>22}" for a in ARMS if a != "random"))
    lines += ["", "Cumulative regret vs oracle (expected quality plays lost): mean [min, max] over seeds",
              f"{'day':<4}" + "".join(f"{a:>22}" for a in ARMS)]
    for row in r["days"]:
        lines.append(f"{row['day']:<4}" + "".join(f"{_mm(row['arms'][a]['cumulative_regret'], '.0f'):>22}" for a in ARMS))
    lines += ["", "keyart models (per seed: day served <- trained on / held out, valid AUC)"]
    for s in r["per_seed"]:
        parts = []
        for d in s["days"][1:]:
            m = d["keyart_model"]
            parts.append(f"d{d['day']}<-{','.join(x[5:] for x in m['train_days'])}/{m['heldout_ds'][5:]}"
                         + ("*" if m["cold_start_split"] else "") + (f" {m['valid_auc']:.3f}" if m.get("valid_auc") else ""))
        lines.append(f"  seed {s['seed']}: " + "; ".join(parts))
    lines.append("  (* = cold start: trained on the early part of the held-out day)")
    g = r["goal"]
    verdict = {True: "MET", False: "NOT MET", None: f"not measured (fewer than {GOAL_FROM_DAY + 1} days)"}[g["met"]]
    lines += ["", f"goal: {g['statement']}: {verdict} "
              + ", ".join(f"day {d}: {x:+.3f}" for d, x in g["keyart_minus_vw_by_day"].items()),
              f"wall time {r['wall_s'] / 60:.1f} min; load average at start {r['load_start']}, at end {r['load_end']}",
              "timings per seed (s): " + "; ".join(f"seed {s['seed']}: {s['timings']}" for s in r["per_seed"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from keyart.bench.loop_arms import VW_ARGS
    from keyart.config import Settings

    size = sizes(args)
    first_seed = args.seed
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keyart-bench-loop-")) if own_workdir else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=workdir / "home", serve_client_clock=True)
    first_seed = settings.sim_seed if first_seed is None else first_seed
    seeds = [first_seed + i for i in range(size["seeds"])]
    vw_args = args.vw_args or VW_ARGS

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    log(f"sizes: {size} seeds {seeds} workdir {workdir}")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from keyart.jobs.common import get_spark

    spark = get_spark("keyart-bench-loop", master="local[2]", shuffle_partitions=4, ui=False, settings=settings)
    try:
        per_seed = [run_seed(spark, settings, s, size, args.start, workdir, vw_args, log) for s in seeds]
    finally:
        spark.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = aggregate(per_seed)
    result = {
        "config": {**size, "seed_list": seeds, "start": args.start, "impressions_per_day": size["visits"] * 10,
                   "vw_args": vw_args, "policy": settings.policy, "squarecb_gamma": settings.squarecb_gamma,
                   "policy_floor": settings.policy_floor, "training_window_days": settings.training_window_days,
                   "workdir": None if own_workdir else str(workdir)},
        "days": rows, "goal": goal(rows), "per_seed": per_seed,
        "wall_s": round(time.perf_counter() - t_start, 1), "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2, default=str) if args.json else format_tables(result))
    return 0
