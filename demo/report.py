"""The demo's report: a headline (served vs the default artwork and the oracle), the gate's
decisions per day by registry version, per-day policy values from ground truth, OPE beside
truth, artwork shares.

Everything valued here uses the simulator's ground truth (``keyart.sim``), which the
pipeline itself never reads; the gate's story comes from the MLflow registry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from keyart import policy as P
from keyart.feature_spec import DEFAULT_PRIOR, SEGMENT_ALL
from keyart.lake import Lake
from keyart.ope import ESTIMATORS

NAMED = {
    "good_will_hunting": ("genre", ("romance", "comedy")),
    "pulp_fiction": ("genre", ("thriller", "comedy")),
    "the_lost_kite": ("profile", ("kids", "adult")),
}


@dataclass
class DayResult:
    """One served day, valued exactly from ground truth (take rate = quality plays per impression)."""

    ds: str
    model_version: str
    impressions: int
    served: float
    random: float
    default: float
    oracle: float
    noncontextual: float | None
    observed_take_rate: float

    @classmethod
    def from_summary(cls, summary: dict[str, Any], model_version: str, noncontextual: float | None) -> DayResult:
        e = summary["expected_take_rate"]
        return cls(ds=summary["ds"], model_version=model_version, impressions=int(summary["impressions"]),
                   served=e["served"], random=e["random"], default=e["default"], oracle=e["oracle"],
                   noncontextual=noncontextual, observed_take_rate=summary["observed_take_rate"])

    @property
    def lift_capture(self) -> float:
        gap = self.oracle - self.random
        return (self.served - self.random) / gap if gap > 0 else float("nan")


def gate_story(settings) -> list[dict[str, Any]]:
    """Per daily run (trained version), what the gate decided, from the registry: the day,
    the trained version, the decision and its reason, the champion after the gate (and
    whether it is a table refresh). Empty without a registry."""
    try:
        from keyart import registry

        if not registry.registry_exists(settings):
            return []
        versions = registry.versions(settings)
    except Exception:  # the report must not fail on an unreachable registry
        return []
    kinds = {str(v.version): registry.version_kind(v.tags) for v in versions}
    out = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        if registry.version_kind(v.tags) != registry.KIND_TRAINED or "keyart.gate.decision" not in v.tags:
            continue
        after = v.tags.get("keyart.gate.champion_after", "none")
        out.append({"ds": v.tags.get(registry.TAG_DS), "version": str(v.version),
                    "decision": v.tags["keyart.gate.decision"], "reason": v.tags.get("keyart.gate.reason", ""),
                    "champion_after": after, "champion_kind": kinds.get(after, ""),
                    "model_from": next((w.tags.get(registry.TAG_MODEL_FROM) for w in versions
                                        if str(w.version) == after), None) or after})
    # A table refresh is made by the gate of its day. A day with a refresh and no trained version
    # is one whose export refused its model (keyart.models.gate): the gate kept the champion and
    # republished it with the day's tables, the refresh's reason says why, and the day keeps its row.
    trained = {v.tags.get(registry.TAG_DS) for v in versions if registry.version_kind(v.tags) == registry.KIND_TRAINED}
    for v in sorted(versions, key=lambda v: int(v.version)):
        ds = v.tags.get(registry.TAG_DS)
        if registry.version_kind(v.tags) == registry.KIND_REFRESH and ds not in trained:
            trained.add(ds)  # one row per day: a rerun adds no refresh, a later one is not this gate's
            out.append({"ds": ds, "version": None, "decision": "kept", "reason": v.tags.get("keyart.refresh_reason", ""),
                        "champion_after": str(v.version), "champion_kind": registry.KIND_REFRESH,
                        "model_from": v.tags.get(registry.TAG_MODEL_FROM) or str(v.version)})
    return sorted(out, key=lambda row: str(row["ds"]))


def version_names(settings) -> dict[str, str]:
    """Bundle version -> ``v<registry version>`` (what serving reports -> what the registry shows)."""
    try:
        from keyart import registry

        if not registry.registry_exists(settings):
            return {}
        return {v.tags[registry.TAG_BUNDLE_VERSION]: f"v{v.version}" for v in registry.versions(settings)
                if v.tags.get(registry.TAG_BUNDLE_VERSION)}
    except Exception:  # the report must not fail on an unreachable registry
        return {}


def noncontextual_value(world, visits, priors_dir: Path, settings) -> float | None:
    """Exact value on ``visits`` of the non-contextual bandit (Thompson on the day's priors).

    Its distribution depends only on the title's candidates, so it is computed once per title.
    """
    files = list(Path(priors_dir).glob("*.parquet"))
    if not files:
        return None
    pri = pd.read_parquet(priors_dir)
    pri = pri[pri["segment"] == SEGMENT_ALL].set_index("artwork_id")
    cfg = P.PolicyConfig(name="beta_ts", floor=settings.policy_floor, thompson_samples=4096)
    rng = np.random.default_rng(0)
    cat = world.catalog
    probs = np.zeros(visits.candidates.shape, dtype=np.float64)
    for t in np.unique(visits.titles):
        mask = visits.titles == t
        cands = visits.candidates[mask][0]
        valid = cands[cands >= 0]
        ids = [cat.art_ids[a] for a in valid]
        alpha = np.array([pri["alpha"].get(i, DEFAULT_PRIOR[0]) for i in ids], dtype=np.float64)
        beta = np.array([pri["beta"].get(i, DEFAULT_PRIOR[1]) for i in ids], dtype=np.float64)
        p = P.probabilities(cfg, np.zeros(len(ids)), np.array([0, len(ids)]), alpha, beta, np.zeros(len(ids)), rng)
        row = np.zeros(cands.shape[0])
        row[: len(ids)] = p
        probs[mask] = row
    return world.expected_value_of_probs(visits, probs)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def artwork_shares(world, lake: Lake, ds: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Which artwork each taste got: the endpoint's impressions of the named titles on ``ds``.

    Members are grouped by ground-truth taste: for Good Will Hunting and Pulp Fiction by their
    favourite genre (``romance fans`` are the members whose strongest genre is romance; members
    whose favourite is neither named genre are ``others``), for The Lost Kite by profile. Beside
    the share of impressions the endpoint gave each artwork (``served``) stands the share the
    oracle (the ground truth's best artwork for that impression's member and context) would
    have given on the same impressions, and the expected quality plays per impression of both.
    """
    from keyart.sim.names import GENRES

    folder = lake.raw("impressions", ds)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        return {}
    # a torn last line (a process killed while writing it) was never acknowledged: skipped
    records = [rec for f in files for rec in _json_lines(f)]
    if not records:
        return {}
    rows = pd.DataFrame.from_records(records)
    # the day's log may hold other clients' pages too (a shared stack): only this world's
    members, arts_known = set(world.members.member_ids), set(world.catalog.art_ids)
    rows = rows[rows["member_id"].isin(members)
                & rows["candidates"].map(lambda c: isinstance(c, list) and set(c) <= arts_known)]
    rows = rows.reset_index(drop=True)
    mem = world.members
    g = {name: i for i, name in enumerate(GENRES)}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for title, (kind, groups) in NAMED.items():
        sub = rows[rows["title_id"] == title].reset_index(drop=True)
        if sub.empty:
            continue
        midx = np.array([world.member_index(m) for m in sub["member_id"]])
        if kind == "genre":
            fav = mem.theta[midx].argmax(1)
            labels = np.full(len(sub), "others", dtype=object)
            for name in groups:
                labels[fav == g[name]] = f"{name} fans"
            order = [f"{name} fans" for name in groups] + ["others"]
        else:
            labels = np.where(mem.is_kids[midx], "kids profiles", "adult profiles").astype(object)
            order = ["kids profiles", "adult profiles"]
        arts = sorted({a for c in sub["candidates"] for a in c})
        cand = np.array([[world.artwork_index(a) for a in arts]] * len(sub))
        ctx = pd.DataFrame(list(sub["context"]))
        q = world.expected_quality_play(
            midx[:, None], cand, ctx["device"].to_numpy()[:, None], ctx["local_hour"].to_numpy()[:, None],
            ctx["day_of_week"].to_numpy()[:, None], ctx["page_row"].to_numpy()[:, None], ctx["position"].to_numpy()[:, None])
        offered = np.array([[a in c for a in arts] for c in map(set, sub["candidates"])])
        q_best = np.where(offered, q, -np.inf)
        oracle = q_best.argmax(1)
        shown = pd.Index(arts).get_indexer(sub["artwork_id"])
        table: dict[str, dict[str, Any]] = {}
        for grp in order:
            sel = labels == grp
            if not sel.any():
                continue
            n = int(sel.sum())
            table[grp] = {
                "impressions": n,
                "served": {a: round(float((shown[sel] == j).mean()), 3) for j, a in enumerate(arts)},
                "oracle": {a: round(float((oracle[sel] == j).mean()), 3) for j, a in enumerate(arts)},
                "served_value": float(q[sel, shown[sel]].mean()),
                "oracle_value": float(q_best[sel].max(1).mean()),
            }
        out[title] = table
    return out


def heldout_truths(world, lake: Lake, ds: str, evaluation: dict[str, Any], window_hours: float = 4.0) -> dict[str, Any]:
    """Exact values of the logging and candidate policies on run ``ds``'s held-out impressions.

    The run valued its policies on the impressions of its held-out labelled day (on a cold
    start, the late part of it; otherwise also late impressions of the day before, labelled
    when their attribution window closed, which the previous policy served). The truths are
    taken on exactly those impressions, with each impression's own member and context:

    ``logging``    mean exact expected quality play of the artwork each impression showed
                   (the logging policy's own draws: exact up to which arm was drawn);
    ``candidate``  sum over candidates of P(candidate policy shows it) x its exact expected
                   quality play, with the probabilities recomputed from the run's model and
                   policy settings (``evaluation``, the run's evaluation.json) as
                   ``keyart.models.evaluate`` computed them: with the same seed and the
                   Beta priors of serving's online rule over the held-out day
                   (:func:`keyart.models.evaluate.online_priors`, evaluation.json's
                   ``online_priors.window_hours``, else ``window_hours``);
    ``candidate_greedy``, ``candidate_model_only``: the candidate's model without exploration
                   (greedy on the blended score) and without the prior blend as well
                   (``prior_blend_n0`` 0); ``oracle`` and ``random`` on the same impressions;
    ``champion``   when the run valued a champion whose bundle is still on disk: the same
                   for the champion's distribution as evaluation built it (what its bundle
                   served where it served, rebuilt elsewhere), so ``candidate - champion``
                   is the true paired difference the gate decided on.
    """
    import lightgbm as lgb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from keyart.models.evaluate import load_heldout, online_priors, policy_targets

    run_dir = lake.run_dir(ds)
    held = load_heldout(lake, ds, run_dir)
    rows, pages = held.rows, held.pages
    held_ids = pa.array(rows["event_id"].unique())
    parts = []
    for day in sorted({str(d) for d in rows["impression_ds"]}):
        t = pq.read_table(lake.clean("impressions") / f"ds={day}", columns=["event_id", "context"])
        parts.append(t.filter(pc.is_in(t.column("event_id"), value_set=held_ids)))
    imp = pa.concat_tables(parts)
    context = imp.column("context").combine_chunks()
    ctx = {name: context.field(name).to_numpy(zero_copy_only=False)
           for name in ("device", "local_hour", "day_of_week", "page_row", "position")}
    pos = pd.Index(imp.column("event_id").to_numpy(zero_copy_only=False)).get_indexer(rows["event_id"].to_numpy())
    if (pos < 0).any():
        raise ValueError(f"run {ds}: {int((pos < 0).sum())} held-out rows have no clean impression")
    member = np.array([world.member_index(m) for m in rows["member_id"]])
    art = np.array([world.artwork_index(a) for a in rows["artwork_id"]])
    q = world.expected_quality_play(member, art, ctx["device"][pos], ctx["local_hour"][pos],
                                    ctx["day_of_week"][pos], ctx["page_row"][pos], ctx["position"][pos])
    booster = lgb.Booster(model_file=str(run_dir / "model.txt"))
    cfg = P.PolicyConfig(**evaluation["policy"])
    # the Beta priors evaluation valued the candidate with: serving's online rule over the day
    # (on the first day the day-start priors are all the default with no impressions behind
    # them, so without the day's evidence the model would get no weight and the policy
    # would be uniform: a different policy from the one evaluated)
    window = float((evaluation.get("online_priors") or {}).get("window_hours", window_hours))
    priors = online_priors(pages, rows, window)
    scores = booster.predict(held.X)
    n = pages.n_impressions
    probs = policy_targets(pages, rows, {"candidate": lambda: scores}, cfg, baselines=False,
                           priors=priors)["candidate"]
    out = {"heldout_ds": held.day, "heldout_part": held.part,
           "impressions": n, "logging": float(q[pages.logged_row].mean()),
           "candidate": float((probs * q).sum() / n)}
    # where the candidate's lift goes: the same model without exploration, and without the
    # prior blend either; the oracle and uniform random on the same impressions
    artworks = rows["artwork_id"].astype(str).to_numpy()
    for name, variant in (("candidate_greedy", replace(cfg, name="greedy")),
                          ("candidate_model_only", replace(cfg, name="greedy", prior_blend_n0=0.0))):
        p = P.probabilities(variant, scores, pages.offsets, *priors,
                            model_mean=P.residual_means(variant, scores, artworks))
        out[name] = float((p * q).sum() / n)
    out["oracle"] = float(np.maximum.reduceat(q, pages.offsets[:-1]).sum() / n)
    out["random"] = float((np.add.reduceat(q, pages.offsets[:-1]) / np.diff(pages.offsets)).sum() / n)
    champion = champion_probabilities(held, evaluation, cfg, priors)
    if champion is not None:
        out["champion"] = float((champion * q).sum() / n)
    return out


def champion_probabilities(held, evaluation: dict[str, Any], cfg: P.PolicyConfig,
                           priors: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray | None:
    """The champion's distribution over ``held``'s candidate rows as evaluation built it, or
    None when the run valued no champion or its bundle is no longer on disk."""
    from keyart import bundle
    from keyart.models.evaluate import as_served, policy_targets
    from keyart.scoring import OnnxScorer

    path = (evaluation.get("champion") or {}).get("bundle")
    if "champion" not in evaluation.get("policies", {}) or not path or not Path(path).is_dir():
        return None
    manifest = bundle.verify(Path(path))
    champion_cfg = P.PolicyConfig(**manifest["policy"]) if isinstance(manifest.get("policy"), dict) else cfg
    scorer = OnnxScorer(Path(path))
    rebuilt = policy_targets(held.pages, held.rows, {"champion": lambda: scorer.predict(held.X).astype(np.float64)},
                             champion_cfg, baselines=False, priors=priors)["champion"]
    return as_served(held.pages, held.rows, rebuilt, manifest.version)[0]


def ope_rows(world, lake: Lake, results: list[DayResult], window_hours: float) -> list[dict[str, Any]]:
    """Per daily run: OPE estimates with intervals beside the true values.

    The truths are the exact values of the logging and candidate policies on the run's own
    held-out impressions (:func:`heldout_truths`). Logged rewards only see quality plays that
    start inside the attribution window, so the truths are scaled by the exact share of plays
    that do."""
    from keyart.sim.traffic import p_delay_within

    seen = p_delay_within(window_hours)
    out = []
    for r in results[:-1]:
        path = lake.run_dir(r.ds) / "evaluation.json"
        if not path.exists():
            continue
        ev = json.loads(path.read_text())
        truths = heldout_truths(world, lake, r.ds, ev, window_hours)
        same = bool((ev.get("candidate_vs_logging") or {}).get("same_policy"))
        for who, truth, est in truth_pairs(ev, truths, seen):
            for estimator in ESTIMATORS:
                e = est.get(estimator)
                if e:
                    out.append({"run": r.ds, "heldout_ds": truths["heldout_ds"], "heldout_part": truths["heldout_part"],
                                "impressions": truths["impressions"], "policy": who, "estimator": estimator,
                                "estimate": e.get("estimate"), "lo": e.get("lo"), "hi": e.get("hi"), "true": truth,
                                "covered": bool(e.get("lo", np.inf) <= truth <= e.get("hi", -np.inf)),
                                "candidate_is_logging": same})
    return out


DIFFERENCE = "candidate_minus_champion"


def truth_pairs(evaluation: dict[str, Any], truths: dict[str, Any], seen: float) -> list[tuple[str, float, dict]]:
    """(what, its true value, its estimates by estimator) for the logging policy, the
    candidate, and with a champion the champion and the paired difference the gate reads."""
    policies = evaluation.get("policies", {})
    out = [(who, truths[who] * seen, policies.get(who, {})) for who in ("logging", "candidate", "champion")
           if who in truths]
    if "champion" in truths:
        out.append((DIFFERENCE, (truths["candidate"] - truths["champion"]) * seen,
                    (evaluation.get("difference") or {}).get(DIFFERENCE, {})))
    return out


def _plots(out: Path, results: list[DayResult], ope: list[dict[str, Any]], shares,
           names: dict[str, str] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names_out = []
    names = names or {}
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(results) + 3), 4.5))
    for label, key, style in (("served (keyart)", "served", "o-"), ("oracle", "oracle", "k--"),
                              ("non-contextual", "noncontextual", "s-"), ("default artwork", "default", "^-"),
                              ("random", "random", "x-")):
        ys = [getattr(r, key) if getattr(r, key) is not None else np.nan for r in results]
        ax.plot(x, ys, style, label=label)
    ax.set_xticks(x, [f"{r.ds[5:]}\n{_served_by(r, names)}" for r in results], fontsize=8)
    ax.set_xlabel("day (MM-DD) and what served it")
    ax.set_ylabel("expected take rate (quality plays / impression)")
    ax.set_title("Take rate per day, from ground truth")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "take_rate.png", dpi=110)
    plt.close(fig)
    names_out.append("take_rate.png")

    if ope:
        runs = sorted({r["run"] for r in ope})
        policies = [p for p in ("logging", "candidate") if any(r["policy"] == p for r in ope)]
        fig, axes = plt.subplots(1, len(policies), figsize=(max(5.0, 1.4 * len(runs) + 2) * len(policies), 4.5),
                                 squeeze=False, sharey=True)
        width = 0.7 / len(ESTIMATORS)
        for ax, policy in zip(axes[0], policies, strict=True):
            for j, est in enumerate(ESTIMATORS):
                rows = [r for r in ope if r["policy"] == policy and r["estimator"] == est]
                xs = np.array([runs.index(r["run"]) for r in rows]) + (j - (len(ESTIMATORS) - 1) / 2) * width
                ests = np.array([r["estimate"] for r in rows], dtype=float)
                err = np.array([[r["estimate"] - r["lo"] for r in rows], [r["hi"] - r["estimate"] for r in rows]],
                               dtype=float).clip(min=0)
                ax.errorbar(xs, ests, yerr=err, fmt="o", capsize=3, color=f"C{j}", label=est)
            truths = {r["run"]: r["true"] for r in ope if r["policy"] == policy}
            ax.hlines([truths[d] for d in runs], np.arange(len(runs)) - 0.42, np.arange(len(runs)) + 0.42,
                      colors="black", linewidth=2, label="true value")
            ax.set_xticks(range(len(runs)), [d[5:] for d in runs])
            ax.set_xlabel("daily run (MM-DD)")
            ax.set_title(f"{policy} policy on the run's held-out impressions", fontsize=9)
        axes[0][0].set_ylabel("take rate")
        axes[0][-1].legend(fontsize=8, title="estimate (95% interval)", title_fontsize=8,
                           loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle("OPE estimates and true values")
        fig.tight_layout()
        fig.savefig(out / "ope.png", dpi=110)
        plt.close(fig)
        names_out.append("ope.png")

    if shares:
        fig, axes = plt.subplots(1, len(shares), figsize=(5.5 * len(shares), 4.8), squeeze=False)
        for ax, (title, groups) in zip(axes[0], shares.items(), strict=False):
            arts = sorted({a for g in groups.values() for a in g["served"]})
            width = 0.8 / max(len(groups), 1)
            for j, (grp, g) in enumerate(groups.items()):
                x = np.arange(len(arts)) + j * width
                ax.bar(x, [g["served"].get(a, 0) for a in arts], width, label=f"{grp} (n={g['impressions']})")
                ax.scatter(x, [g["oracle"].get(a, 0) for a in arts], marker="_", s=200, linewidths=2, color="black", zorder=3)
            ax.set_xticks(np.arange(len(arts)) + 0.4 - width / 2, [a.replace(title + "-", "") for a in arts],
                          rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{title}: served (bars), oracle (dashes)", fontsize=9)
            ax.set_ylabel("share of impressions")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "artwork_share.png", dpi=110)
        plt.close(fig)
        names_out.append("artwork_share.png")
    return names_out


def _served_by(r: DayResult, names: dict[str, str]) -> str:
    """What served a day: the registry version when the registry knows the bundle."""
    return names.get(r.model_version, r.model_version if len(r.model_version) <= 12 else r.model_version[:12] + "…")


def headline(results: list[DayResult], names: dict[str, str]) -> list[str]:
    """The report's first lines: what keyart served against the default artwork (what a
    catalog shows without keyart) and against the oracle, over the days a model served."""
    served = [r for r in results if r.model_version not in ("random", "default")] or results
    imp = np.array([r.impressions for r in served], dtype=float)

    def mean(key: str) -> float:
        return float(np.average([getattr(r, key) for r in served], weights=imp))

    s, d, o = mean("served"), mean("default"), mean("oracle")
    gap = o - d
    days = f"{served[0].ds} to {served[-1].ds}" if len(served) > 1 else served[0].ds
    lines = [f"**keyart served a take rate of {s:.4f} against {d:.4f} for the default artwork "
             f"({(s / d - 1) * 100:+.1f}%) and {o:.4f} for the oracle** (expected quality plays per "
             f"impression from ground truth, {int(imp.sum())} impressions of {len(served)} day(s) served by a "
             f"registered model, {days})."]
    if gap > 0:
        lines.append(f"It closed {(s - d) / gap:.0%} of the gap between the default artwork and the oracle; "
                     f"on the last day {results[-1].served:.4f} vs {results[-1].default:.4f} (default) and "
                     f"{results[-1].oracle:.4f} (oracle), served by {_served_by(results[-1], names)}.")
    lines.append(day_over_day(served))
    return lines


DAY_OVER_DAY_SLACK = 0.01
"""A served day counts as "not below the day before" when it is above it or within this share of it."""


def day_over_day(served: list[DayResult]) -> str:
    """One line: the last day's served take rate as a multiple of the default artwork's, and
    whether each served day is above the day before or within :data:`DAY_OVER_DAY_SLACK`, both for
    the take rate itself and for its ratio to the default artwork (the world's own traffic moves
    the take rate from day to day; the ratio takes that out)."""
    def ratio(r: DayResult) -> float:
        return r.served / r.default if r.default > 0 else float("nan")

    def steps(values: list[float]) -> str:
        bad = [f"{served[i + 1].ds} {(values[i + 1] / values[i] - 1) * 100:+.1f}%"
               for i in range(len(values) - 1) if values[i + 1] < values[i] * (1 - DAY_OVER_DAY_SLACK)]
        return "yes" if not bad else "no (" + ", ".join(bad) + ")"

    last = served[-1]
    return (f"Last day ({last.ds}): served {ratio(last):.3f} × the default artwork's take rate. "
            f"Every served day above the day before or within {DAY_OVER_DAY_SLACK:.0%}: take rate "
            f"{steps([r.served for r in served])}; ratio to the default {steps([ratio(r) for r in served])} "
            f"(per day: {' / '.join(f'{ratio(r):.3f}' for r in served)}).")


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def write_report(out: Path, world, lake: Lake, results: list[DayResult], days: list[str], endpoint_url: str,
                 settings, step_times: list[tuple[str, float]], ran_on: list[str] | None = None,
                 where_next: list[str] | None = None, topology: str = "embedded") -> Path:
    """The report: ``ran_on`` says where the loop ran (embedded defaults or the stack),
    ``where_next`` the places to look afterwards (default: the make targets of one machine)."""
    out.mkdir(parents=True, exist_ok=True)
    shares = artwork_shares(world, lake, days[-1])
    ope = ope_rows(world, lake, results, settings.attribution_window_hours)
    names = version_names(settings)
    story = gate_story(settings)
    plots = _plots(out, results, ope, shares, names)
    lines = ["# keyart demo report", "", *headline(results, names), "",
             f"World: {world.catalog.n_titles} titles, {world.catalog.n_artworks} artworks, "
             f"{len(world.members.member_ids)} members, seed {world.config.seed}. Quality play: "
             f">= {settings.quality_play_minutes:g} min within {settings.attribution_window_hours:g} h. Policy: {settings.policy}.",
             *(["", *ran_on] if ran_on else []),
             "", "## Take rate per day (expected quality plays per impression, from ground truth)", "",
             "| day | served by | impressions | served | random | non-contextual | default art | oracle | lift capture | observed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.ds} | {_served_by(r, names)} | {r.impressions} | {_fmt(r.served)} | {_fmt(r.random)} | "
                     f"{_fmt(r.noncontextual)} | {_fmt(r.default)} | {_fmt(r.oracle)} | {_fmt(r.lift_capture)} | {_fmt(r.observed_take_rate)} |")
    lines += ["", "Columns: **day** the day traffic was served; **served by** what decided on that day "
              "(`random`: day 0's uniform exploration before any model; `vN`: version N of the registered model "
              "`keyart-artwork`, the `@champion` the endpoint loaded); **impressions** decisions that day; "
              "**served** the exact expected take rate of what the endpoint showed; **random** uniform over the "
              "candidates; **non-contextual** per-title Thompson sampling on the previous day's Beta priors (no "
              "model); **default art** always the title's default artwork (a catalog without keyart); **oracle** "
              "the ground truth's best artwork for each impression's member and context; **lift capture** "
              "(served − random) / (oracle − random); **observed** quality plays per impression actually logged "
              "(one draw of the served value, only plays that start inside the attribution window). All values "
              "except observed are exact expectations on that day's impressions.", ""]
    if story:
        lines += ["## What the gate decided, day by day", "",
                  "Each daily run trains a challenger on the data up to its day; the gate compares it with the "
                  f"champion on the held-out day (the paired {settings.promotion_estimator} difference, "
                  "non-inferiority with δ, docs/mlflow.md) "
                  "and either promotes it or keeps the champion's model and republishes it with the day's tables "
                  "(a table refresh). The endpoint serves the champion on the next day.", "",
                  "| run (ds) | challenger | decision | champion after | serves the model of | reason |",
                  "|---|---|---|---|---|---|"]
        for g in story:
            kind = " (table refresh)" if g["champion_kind"] == "table_refresh" else ""
            challenger = f"v{g['version']}" if g["version"] else "none (export refused)"
            lines.append(f"| {g['ds']} | {challenger} | {g['decision']} | v{g['champion_after']}{kind} | "
                         f"v{g['model_from']} | {g['reason'].replace('|', '/')} |")
        lines += ["", "Columns: **run** the day the DAG processed; **challenger** the version it trained; "
                  "**decision** promoted / kept (the champion stays) / already_champion; **champion after** the "
                  "`@champion` version after the gate (a table refresh is the champion's model with the run's "
                  "tables); **serves the model of** the trained version whose model.onnx that champion carries; "
                  "**reason** the gate's recorded reason (`keyart.gate.reason`).", ""]
    if ope:
        lines += ["## Offline evaluation beside the truth", "",
                  "Each daily run values policies on the impressions of its held-out labelled day (on the first "
                  "day, its late part; later days also hold late impressions of the day before, labelled when "
                  "their attribution window closed). The true values are exact on those same impressions: for "
                  "the logging policy, the expected quality play of the artwork each one showed; for the "
                  "candidate, its probabilities (recomputed from the run's model and policy, with the Beta priors "
                  "serving's online rule held at each impression, as evaluation computed them) times each "
                  "candidate's expected quality play. Both are scaled by the exact share of plays that start "
                  f"inside the attribution window ({settings.attribution_window_hours:g} h), since logged rewards "
                  "only see those. With a champion, the same for the champion's distribution as evaluation built it "
                  "(what its bundle served where it served, rebuilt elsewhere) and for the paired difference "
                  "candidate − champion the gate decides on. The candidate's value when it actually served is in "
                  "the table above.", "",
                  "| run | held-out impressions | policy | estimator | estimate | 95% interval | true | covered |",
                  "|---|---|---|---|---|---|---|---|"]
        same = [r["run"] for r in ope if r.get("candidate_is_logging")]
        for row in ope:
            lines.append(f"| {row['run']} | {row['impressions']} ({row['heldout_part']}) | {row['policy']} | "
                         f"{row['estimator']} | {_fmt(row['estimate'])} | "
                         f"[{_fmt(row['lo'])}, {_fmt(row['hi'])}] | {_fmt(row['true'])} | {'yes' if row['covered'] else 'no'} |")
        lines += ["", "Columns: **run** the daily run (its ds); **held-out impressions** how many impressions it "
                  "valued the policies on (`late`: the late part of the first labelled day, `all`: the whole "
                  "held-out day); **policy** `logging` (what was served then), `candidate` (the run's own "
                  "model behind the exploration policy), `champion` (the champion it was compared with) or "
                  "`candidate_minus_champion` (their paired difference); **estimator** replay, IPS, SNIPS or DR; **estimate** and "
                  "**95% interval** the estimator's value and its bootstrap interval (clustered by member); **true** "
                  "the exact value on the same impressions; **covered** whether the interval holds it.", ""]
        if same:
            lines += [f"On run(s) {', '.join(sorted(set(same)))} the candidate's distribution is the logged one "
                      "(evaluation.json `candidate_vs_logging`: no candidate's probability differs), so its estimates "
                      "are the logging policy's by construction, not by a fault of the estimators: every importance "
                      "weight is 1, so IPS and SNIPS return the logged mean reward (and DR too when q-hat is flat "
                      "within an impression). The policy blends the model with each candidate's Beta prior by the "
                      "prior's impressions, n / (n + prior_blend_n0): where no impression stands behind any "
                      "candidate's prior (the first day's day-start priors are all the default, n = 0, and only the "
                      "day's own closed attribution windows add evidence) the model gets no weight and the policy "
                      "stays on the logged uniform distribution.", ""]
        lines += [f"{sum(r['covered'] for r in ope)} of {len(ope)} intervals hold the true value.", ""]
    if shares:
        lines += [f"## Which artwork each taste got (endpoint impressions on {days[-1]})", "",
                  "Members grouped by ground-truth taste (their favourite genre; kids or adult profile for The "
                  "Lost Kite). Each cell: share of the group's impressions the endpoint showed that artwork, and "
                  "in brackets the share the oracle (the best artwork for that impression's member and context) "
                  "would have shown on the same impressions. Value: expected quality plays per impression, "
                  "served / oracle.", ""]
        for title, groups in shares.items():
            lines.append(f"**{title}**")
            lines.append("")
            arts = sorted({a for g in groups.values() for a in g["served"]})
            lines.append("| group | impressions | " + " | ".join(a.replace(title + "-", "") for a in arts) + " | value served / oracle |")
            lines.append("|---|---|" + "---|" * len(arts) + "---|")
            for grp, g in groups.items():
                cells = " | ".join(f"{g['served'].get(a, 0):.0%} ({g['oracle'].get(a, 0):.0%})" for a in arts)
                lines.append(f"| {grp} | {g['impressions']} | {cells} | {g['served_value']:.4f} / {g['oracle_value']:.4f} |")
            lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    where_next = where_next or [
        "- `make mlflow-ui` — every daily run: params, OPE metrics, plots, the model card; the `keyart-artwork` "
        "registered model with its `champion` / `challenger` aliases.",
        "- `make airflow-ui` — the `keyart_daily` DAG and its runs, task by task, with logs.",
        f"- `make serve` — the endpoint (this demo's ran at {endpoint_url}); `POST /v1/artwork`, `/metrics`, `/docs`."]
    lines += ["## Where to look next", "", *where_next,
              f"- The lake: `{lake.root}` (raw logs, clean partitions, quarantine, features, priors, run folders).", "",
              "## Step times", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {label} | {sec:.1f} |" for label, sec in step_times]
    report = out / "demo.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "demo.json").write_text(json.dumps({"days": [asdict(r) for r in results], "ope": ope, "shares": shares,
                                               "gate": story, "versions": names, "topology": topology,
                                               "ran_on": ran_on or []}, indent=2))
    return report
