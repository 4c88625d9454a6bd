"""``keyart bench loop``: the closed loop over simulated days, keyart against three baselines.

For every seed a world is built (the seed is the world's, the visits' and the arms'), its
90-day viewing history is ingested, and for each day every arm decides exactly the same
visits (``world.visits(ds, n, seed)``):

``keyart``         one deployment per seed (its own lake and MLflow registry): day 0 uniform
                   random, logged to the lake; day k >= 1 the daily DAG's steps for day k - 1
                   (Spark jobs, data-quality gate, train, evaluate, export, register, gate
                   with its table refresh), then the endpoint's runtime picks up
                   ``@champion`` and decides day k with its online priors, rewards arriving
                   hour by hour (:mod:`keyart.bench.loop_keyart`);
``random``         uniform over the candidates (valued exactly);
``noncontextual``  Beta-Thompson per (title, artwork), online per event;
``vw``             Vowpal Wabbit ``--cb_explore_adf --squarecb``, online per event
                   (:mod:`keyart.bench.loop_arms`).

Per day and arm: the expected take rate of the arm's decisions from the ground truth, the
lift capture (V - V_random) / (V_oracle - V_random) and the cumulative regret against the
oracle in expected quality plays; mean, min and max over seeds; the issue's targets
(:func:`goal`); and the coverage of every daily run's OPE interval for the logging policy
(:func:`ope_rows`). ``--json`` prints the same.
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
# The targets (issue 17): the final day's lift capture, the rise over day 1, and the days
# from which keyart must be ahead of each online arm.
FINAL_DAY, FINAL_LIFT = 6, 0.78
RISE_FROM_DAY, RISE_BY = 3, 0.05
AHEAD_OF_VW_FROM, AHEAD_OF_NONCONTEXTUAL_FROM = 1, 2
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


def run_seed(spark, seed: int, size: dict[str, int], start: str, workdir: Path, vw_args: str, log) -> dict[str, Any]:
    """All arms over all days for one seed; keyart runs as its own deployment (lake, registry, endpoint)."""
    from dataclasses import replace

    from keyart.bench.loop_arms import NonContextualArm, VWArm
    from keyart.bench.loop_keyart import KeyartPipeline, deployment_env
    from keyart.config import settings
    from keyart.lake import Lake, shift_ds
    from keyart.policy import PolicyConfig
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    t_seed = time.perf_counter()
    timings: dict[str, float] = {}
    root = workdir / f"seed-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    lake = Lake(root / "lake")
    with deployment_env(root, lake.root):
        s = settings()
        t0 = time.perf_counter()
        world = World.build(seed=seed, n_titles=size["titles"], n_members=size["members"], start=start)
        world.save(lake.root)
        timings["world_s"] = time.perf_counter() - t0
        pipe = KeyartPipeline(spark, lake)
        t0 = time.perf_counter()
        pipe.ingest_history(shift_ds(start, -world.config.history_days), shift_ds(start, -1))
        affinity = pipe.history_affinity(shift_ds(start, -1), world.members.member_ids)
        timings["history_s"] = time.perf_counter() - t0
        # beta_ts with keyart's configured floor; 256 samples per propensity estimate keeps it fast
        nc_cfg = replace(PolicyConfig.from_settings(s), name="beta_ts", thompson_samples=256)
        nc = NonContextualArm(world.catalog.n_artworks, nc_cfg, seed=seed)
        vw = VWArm(world, affinity, args=vw_args, seed=seed)
        days: list[dict[str, Any]] = []
        timings.update(keyart_decide_s=0.0, noncontextual_s=0.0, vw_s=0.0)
        try:
            for k in range(size["days"]):
                ds = shift_ds(start, k)
                visits = world.visits(ds, size["visits"], seed)
                values = world.candidate_values(visits)
                run: dict[str, Any] | None = None
                served: dict[str, Any] = {"version": "random"}
                if k == 0:  # a cold start explores uniformly, as the endpoint does without a model
                    chooser = RandomChooser()
                else:
                    log(f"seed {seed} day {k} {ds}: daily run for {shift_ds(ds, -1)}")
                    run = pipe.daily_run(shift_ds(ds, -1))
                    served = pipe.serve()
                    chooser = pipe.chooser()
                    gate = run.get("gate") or {}
                    log(f"seed {seed} day {k} {ds}: gate {gate.get('decision', run.get('failed') or run.get('skipped'))}; "
                        f"serving v{served.get('registry_version', served['version'])} (model of {served.get('model_ds')}, "
                        f"tables of {served.get('tables_ds')})")
                t0 = time.perf_counter()
                summary = simulate_day(world, ds, chooser, visits=visits, seed=seed, lake_root=lake.root,
                                       send_rewards=k > 0, attribution_window_hours=s.attribution_window_hours)
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
                    "oracle": truth["oracle"], "default": truth["default"],
                    "value": {"keyart": truth["served"], "random": truth["random"],
                              "noncontextual": world.expected_value(visits, nc_day.artwork_idx),
                              "vw": world.expected_value(visits, vw_day.artwork_idx)},
                    "observed_take_rate": {"keyart": summary["observed_take_rate"],
                                           "noncontextual": float(nc_day.reward.mean()), "vw": float(vw_day.reward.mean())},
                    "keyart_served": served, "keyart_run": run, "keyart_rewards": summary.get("rewards"),
                })
                log(f"seed {seed} day {k} {ds}: " + day_line(days[-1]))
            try:
                ope = ope_rows(world, lake, days, s.attribution_window_hours)
            except Exception as exc:  # the check must not cost the run's figures
                log(f"seed {seed}: OPE coverage check failed: {type(exc).__name__}: {exc}")
                ope = [{"error": f"{type(exc).__name__}: {exc}"}]
        finally:
            vw.close()
            pipe.close()
    timings.update({f"keyart_{k}_s": v for k, v in pipe.timings.items()})
    timings["total_s"] = time.perf_counter() - t_seed
    result = {"seed": seed, "days": days, "ope": ope, "timings": {k: round(v, 1) for k, v in timings.items()}}
    # a long run stopped later still leaves every finished seed's figures
    (root / "seed.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def day_line(d: dict[str, Any]) -> str:
    """One day's lift capture per arm, for the progress log."""
    from keyart.bench.loop_arms import lift_capture

    return "lift capture " + ", ".join(
        f"{arm} {lift_capture(d['value'][arm], d['value']['random'], d['oracle']):.3f}"
        for arm in ARMS if arm != "random")


def ope_rows(world, lake, days: list[dict[str, Any]], window_hours: float) -> list[dict[str, Any]]:
    """Every daily run's OPE intervals beside their true values: for the logging policy and,
    when the run had a champion, for the paired difference candidate - champion the gate
    decided on (``quantity``).

    The truths are exact on the held-out impressions (:func:`keyart.demo.report.heldout_truths`:
    for the logging policy the expected quality play of what they showed), scaled by the share
    of quality plays that start inside the attribution window (logged rewards see only those)."""
    from keyart.demo.report import DIFFERENCE, heldout_truths, truth_pairs
    from keyart.ope import ESTIMATORS
    from keyart.sim.traffic import p_delay_within

    seen = p_delay_within(window_hours)
    out = []
    for d in days:
        run = d.get("keyart_run")
        if not run or not (lake.run_dir(run["ds"]) / "evaluation.json").exists():
            continue
        path = lake.run_dir(run["ds"]) / "evaluation.json"
        ev = json.loads(path.read_text())
        truth = heldout_truths(world, lake, run["ds"], ev)
        out.append({"run": run["ds"], "quantity": "lift_capture", **lift_decomposition(truth)})
        for quantity, true, est in truth_pairs(ev, truth, seen):
            if quantity not in ("logging", DIFFERENCE):
                continue
            for estimator in ESTIMATORS:
                e = est.get(estimator)
                if e:
                    out.append({"run": run["ds"], "quantity": quantity, "heldout_part": truth["heldout_part"],
                                "impressions": truth["impressions"], "estimator": estimator,
                                "estimate": e["estimate"], "lo": e["lo"], "hi": e["hi"],
                                "true": true, "covered": bool(e["lo"] <= true <= e["hi"]),
                                "ess_share": (ev.get("weights") or {}).get("logging", {}).get("ess_share")
                                if quantity == "logging" else None})
    return out


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
    """The issue's targets on keyart's served lift capture (mean over seeds; ``all_seeds`` also
    checks every seed's own figures). A target whose days were not run is ``None``."""
    lift = {r["day"]: r["arms"] for r in rows}

    def lc(day: int, arm: str, stat: str = "mean") -> float:
        return lift[day][arm]["lift_capture"][stat]

    out: dict[str, Any] = {}
    last = max(lift)
    out["final_day"] = {
        "statement": f"day {FINAL_DAY} lift capture >= {FINAL_LIFT}",
        "day": FINAL_DAY, "mean": lc(FINAL_DAY, "keyart") if FINAL_DAY in lift else None,
        "min": lc(FINAL_DAY, "keyart", "min") if FINAL_DAY in lift else None,
        "met": lc(FINAL_DAY, "keyart") >= FINAL_LIFT if FINAL_DAY in lift else None}
    rise = {d: lc(d, "keyart") - lc(1, "keyart") for d in range(RISE_FROM_DAY, last + 1)} if 1 in lift else {}
    out["rises"] = {"statement": f"every day from {RISE_FROM_DAY} on >= day 1 + {RISE_BY}",
                    "minus_day_1": rise, "met": all(x >= RISE_BY for x in rise.values()) if rise else None}
    for arm, first in (("vw", AHEAD_OF_VW_FROM), ("noncontextual", AHEAD_OF_NONCONTEXTUAL_FROM)):
        margin = {d: lc(d, "keyart") - lc(d, arm) for d in range(first, last + 1)}
        out[f"ahead_of_{arm}"] = {"statement": f"ahead of {arm} on every day from {first} on",
                                  "keyart_minus": margin, "met": all(x > 0 for x in margin.values()) if margin else None}
    out["met"] = all(g["met"] for g in out.values() if isinstance(g, dict)) if all(
        g["met"] is not None for g in out.values() if isinstance(g, dict)) else None
    return out


DECOMPOSITION = ("candidate", "candidate_greedy", "candidate_model_only", "champion")
"""What :func:`lift_decomposition` values on a run's held-out impressions."""


def lift_decomposition(truth: dict[str, Any]) -> dict[str, float]:
    """Lift capture on a run's held-out impressions (:func:`keyart.demo.report.heldout_truths`)
    of the candidate as it would serve (its exploration policy), greedy on the same blended
    score, greedy on the model alone, and the champion it was compared with: how much of the
    gap exploration, the prior blend and the gate's choice each cost."""
    from keyart.bench.loop_arms import lift_capture

    return {k: lift_capture(truth[k], truth["random"], truth["oracle"]) for k in DECOMPOSITION if k in truth}


def decomposition_summary(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per daily run (in order), :func:`lift_decomposition`'s mean over seeds."""
    runs: dict[int, dict[str, list[float]]] = {}
    for s in per_seed:
        rows = [r for r in s.get("ope", []) if r.get("quantity") == "lift_capture"]
        for i, r in enumerate(rows):
            for k in DECOMPOSITION:
                if k in r:
                    runs.setdefault(i, {}).setdefault(k, []).append(r[k])
    return [{"run": i + 1, **{k: sum(v) / len(v) for k, v in by.items()}} for i, by in sorted(runs.items())]


def ope_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Over every run of every seed, per estimator: the coverage of the logging policy's
    intervals (``by_estimator``) and of the gate's paired difference candidate - champion
    (``difference_by_estimator``, with the mean interval width and mean |estimate - truth|)."""
    rows = [r for s in per_seed for r in s.get("ope", []) if "error" not in r and "estimator" in r]
    by: dict[str, dict[str, Any]] = {"logging": {}, "candidate_minus_champion": {}}
    for r in rows:
        e = by.setdefault(r.get("quantity", "logging"), {}).setdefault(
            r["estimator"], {"runs": 0, "covered": 0, "width": 0.0, "abs_error": 0.0})
        e["runs"] += 1
        e["covered"] += int(r["covered"])
        e["width"] += r["hi"] - r["lo"]
        e["abs_error"] += abs(r["estimate"] - r["true"])
    for table in by.values():
        for e in table.values():
            e["coverage"] = e["covered"] / e["runs"]
            e["mean_width"] = e.pop("width") / e["runs"]
            e["mean_abs_error"] = e.pop("abs_error") / e["runs"]
    shares = [r["ess_share"] for r in rows if r.get("ess_share") is not None]
    return {"by_estimator": by["logging"], "difference_by_estimator": by["candidate_minus_champion"],
            "logging_ess_share_min": min(shares) if shares else None,
            "lift_decomposition": decomposition_summary(per_seed)}


def _mm(s: dict[str, float], fmt: str) -> str:
    return f"{format(s['mean'], fmt)} [{format(s['min'], fmt)}, {format(s['max'], fmt)}]"


def _served(d: dict[str, Any]) -> str:
    run, served = d.get("keyart_run") or {}, d["keyart_served"]
    decision = (run.get("gate") or {}).get("decision") or ("failed at " + run["failed"]["step"] if run.get("failed") else "-")
    model_ds, tables_ds = served.get("model_ds"), served.get("tables_ds")
    what = f"model {model_ds[5:]}" if model_ds else served["version"]
    if tables_ds and tables_ds != model_ds:
        what += f" + tables {tables_ds[5:]}"
    return f"d{d['day']} {decision}: {what}"


def format_tables(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"keyart bench loop: {c['days']} days x {c['seeds']} seeds (seeds {', '.join(map(str, c['seed_list']))}); "
             f"{c['visits']} visits/day x 10 titles = {c['impressions_per_day']} impressions/day per arm; "
             f"{c['titles']} titles, {c['members']} members; policy {c['policy']}; vw: {c['vw_args']}",
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
    lines += ["", "keyart per seed: the gate's decision on the run for the day before, and what the endpoint served"]
    for s in r["per_seed"]:
        lines.append(f"  seed {s['seed']}: " + "; ".join(_served(d) for d in s["days"][1:]))
    o = r["ope"]
    if o["by_estimator"]:
        lines += ["", "OPE of the logging policy on each run's held-out impressions (truth from the simulator): "
                  + ", ".join(f"{e} {v['covered']}/{v['runs']}" for e, v in o["by_estimator"].items())
                  + f" intervals cover; smallest ESS share {o['logging_ess_share_min']:.3f}"]
    if o.get("difference_by_estimator"):
        lines += ["The gate's paired difference candidate - champion, same truth: " + ", ".join(
            f"{e} {v['covered']}/{v['runs']} cover, mean width {v['mean_width']:.5f}, mean |error| {v['mean_abs_error']:.5f}"
            for e, v in o["difference_by_estimator"].items())]
    if o.get("lift_decomposition"):
        lines += ["", "Each daily run's model on its held-out impressions, lift capture (mean over seeds): as served "
                  "(exploration), greedy, greedy on the model alone (no prior blend), and the champion it was compared with",
                  f"{'run':<4}" + "".join(f"{k:>22}" for k in DECOMPOSITION)]
        for row in o["lift_decomposition"]:
            lines.append(f"{row['run']:<4}" + "".join(f"{row[k]:>22.3f}" if k in row else f"{'-':>22}"
                                                      for k in DECOMPOSITION))
    verdict = {True: "MET", False: "NOT MET", None: "not measured"}
    lines.append("")
    for g in r["goal"].values():
        if isinstance(g, dict):
            figures = g.get("minus_day_1") or g.get("keyart_minus") or {}
            detail = ", ".join(f"day {d}: {x:+.3f}" for d, x in figures.items()) if figures else (
                f"mean {g['mean']:.3f}, min {g['min']:.3f}" if g.get("mean") is not None else "")
            lines.append(f"target: {g['statement']}: {verdict[g['met']]} ({detail})")
    lines += [f"wall time {r['wall_s'] / 60:.1f} min; load average at start {r['load_start']}, at end {r['load_end']}",
              "timings per seed (s): " + "; ".join(f"seed {s['seed']}: {s['timings']}" for s in r["per_seed"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from keyart.bench.loop_arms import VW_ARGS
    from keyart.config import Settings

    size = sizes(args)
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keyart-bench-loop-")) if own_workdir else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=workdir / "home")
    first_seed = settings.sim_seed if args.seed is None else args.seed
    seeds = [first_seed + i for i in range(size["seeds"])]
    vw_args = args.vw_args or VW_ARGS

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    log(f"sizes: {size} seeds {seeds} workdir {workdir}")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from keyart.jobs.common import get_spark

    spark = get_spark("keyart-bench-loop", master="local[2]", shuffle_partitions=4, ui=False, settings=settings)
    try:
        per_seed = [run_seed(spark, s, size, args.start, workdir, vw_args, log) for s in seeds]
    finally:
        spark.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = aggregate(per_seed)
    result = {
        "config": {**size, "seed_list": seeds, "start": args.start, "impressions_per_day": size["visits"] * 10,
                   "vw_args": vw_args, "policy": settings.policy, "squarecb_gamma": settings.squarecb_gamma,
                   "squarecb_gap_unit": settings.squarecb_gap_unit, "policy_floor": settings.policy_floor,
                   "prior_blend_n0": settings.prior_blend_n0, "prior_blend": settings.prior_blend,
                   "training_window_days": settings.training_window_days,
                   "promotion_noninferiority_margin": settings.promotion_noninferiority_margin,
                   "workdir": None if own_workdir else str(workdir)},
        "days": rows, "goal": goal(rows), "ope": ope_summary(per_seed), "per_seed": per_seed,
        "wall_s": round(time.perf_counter() - t_start, 1), "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2, default=str) if args.json else format_tables(result))
    return 0
