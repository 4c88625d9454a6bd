"""The demo's report: per-day policy values from ground truth, OPE beside truth, artwork shares.

Everything valued here uses the simulator's ground truth (``keyart.sim``), which the
pipeline itself never reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
    rows = pd.concat([pd.read_json(f, lines=True) for f in files], ignore_index=True)
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


def heldout_truths(world, lake: Lake, ds: str, evaluation: dict[str, Any]) -> dict[str, Any]:
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
                   ``keyart.models.evaluate`` computed them.
    """
    import lightgbm as lgb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from keyart.models.evaluate import load_heldout, policy_targets

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
    probs = policy_targets(pages, rows, {"candidate": lambda: booster.predict(held.X)}, cfg, baselines=False)["candidate"]
    return {"heldout_ds": held.day, "heldout_part": held.part,
            "impressions": pages.n_impressions, "logging": float(q[pages.logged_row].mean()),
            "candidate": float((probs * q).sum() / pages.n_impressions)}


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
        truths = heldout_truths(world, lake, r.ds, ev)
        for who in ("logging", "candidate"):
            truth = truths[who] * seen
            est = ev.get("policies", {}).get(who, {})
            for estimator in ESTIMATORS:
                e = est.get(estimator)
                if e:
                    out.append({"run": r.ds, "heldout_ds": truths["heldout_ds"], "heldout_part": truths["heldout_part"],
                                "impressions": truths["impressions"], "policy": who, "estimator": estimator,
                                "estimate": e.get("estimate"), "lo": e.get("lo"), "hi": e.get("hi"), "true": truth,
                                "covered": bool(e.get("lo", np.inf) <= truth <= e.get("hi", -np.inf))})
    return out


def _plots(out: Path, results: list[DayResult], ope: list[dict[str, Any]], shares) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, key, style in (("served (keyart)", "served", "o-"), ("oracle", "oracle", "k--"),
                              ("non-contextual", "noncontextual", "s-"), ("default artwork", "default", "^-"),
                              ("random", "random", "x-")):
        ys = [getattr(r, key) if getattr(r, key) is not None else np.nan for r in results]
        ax.plot(x, ys, style, label=label)
    ax.set_xticks(x, [f"{r.ds}\n{r.model_version}" for r in results], fontsize=7)
    ax.set_ylabel("expected take rate (quality plays / impression)")
    ax.set_title("Take rate per day, from ground truth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "take_rate.png", dpi=110)
    plt.close(fig)
    names.append("take_rate.png")

    if ope:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for j, row in enumerate(ope):
            lo, hi, est = row["lo"], row["hi"], row["estimate"]
            ax.errorbar(j, est, yerr=[[est - lo], [hi - est]], fmt="o", color="C0" if row["policy"] == "candidate" else "C1")
            ax.plot(j, row["true"], "k_", markersize=14)
        ax.set_xticks(range(len(ope)), [f"{r['run'][5:]} {r['policy'][:4]} {r['estimator']}" for r in ope], rotation=90, fontsize=6)
        ax.set_ylabel("take rate")
        ax.set_title("OPE estimates (95% CI) and true values (black)")
        fig.tight_layout()
        fig.savefig(out / "ope.png", dpi=110)
        plt.close(fig)
        names.append("ope.png")

    if shares:
        fig, axes = plt.subplots(1, len(shares), figsize=(5.5 * len(shares), 4.5), squeeze=False)
        for ax, (title, groups) in zip(axes[0], shares.items(), strict=False):
            arts = sorted({a for g in groups.values() for a in g["served"]})
            width = 0.8 / max(len(groups), 1)
            for j, (grp, g) in enumerate(groups.items()):
                x = np.arange(len(arts)) + j * width
                ax.bar(x, [g["served"].get(a, 0) for a in arts], width, label=f"{grp} (n={g['impressions']})")
                ax.scatter(x, [g["oracle"].get(a, 0) for a in arts], marker="_", s=200, linewidths=2, color="black", zorder=3)
            ax.set_xticks(np.arange(len(arts)) + 0.4 - width / 2, [a.replace(title + "-", "") for a in arts], rotation=30, fontsize=8)
            ax.set_title(f"{title}: served (bars), oracle (dashes)", fontsize=9)
            ax.set_ylabel("share of impressions")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "artwork_share.png", dpi=110)
        plt.close(fig)
        names.append("artwork_share.png")
    return names


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def write_report(out: Path, world, lake: Lake, results: list[DayResult], days: list[str], endpoint_url: str,
                 settings, step_times: list[tuple[str, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shares = artwork_shares(world, lake, days[-1])
    ope = ope_rows(world, lake, results, settings.attribution_window_hours)
    plots = _plots(out, results, ope, shares)
    lines = ["# keyart demo report", "",
             f"World: {world.catalog.n_titles} titles, {world.catalog.n_artworks} artworks, "
             f"{len(world.members.member_ids)} members, seed {world.config.seed}. Quality play: "
             f">= {settings.quality_play_minutes:g} min within {settings.attribution_window_hours:g} h. Policy: {settings.policy}.",
             "", "## Take rate per day (expected quality plays per impression, from ground truth)", "",
             "| day | served by | impressions | served | random | non-contextual | default art | oracle | lift capture | observed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.ds} | {r.model_version} | {r.impressions} | {_fmt(r.served)} | {_fmt(r.random)} | "
                     f"{_fmt(r.noncontextual)} | {_fmt(r.default)} | {_fmt(r.oracle)} | {_fmt(r.lift_capture)} | {_fmt(r.observed_take_rate)} |")
    lines += ["", "Lift capture = (served − random) / (oracle − random).", ""]
    if ope:
        lines += ["## Offline evaluation beside the truth", "",
                  "Each daily run values policies on the impressions of its held-out labelled day (on the first "
                  "day, its late part; later days also hold late impressions of the day before, labelled when "
                  "their attribution window closed). The true values are exact on those same impressions: for "
                  "the logging policy, the expected quality play of the artwork each one showed; for the "
                  "candidate, its probabilities (recomputed from the run's model and policy) times each "
                  "candidate's expected quality play. Both are scaled by the exact share of plays that start "
                  f"inside the attribution window ({settings.attribution_window_hours:g} h), since logged rewards "
                  "only see those. The candidate's value when it actually served is in the table above.", "",
                  "| run | held-out impressions | policy | estimator | estimate | 95% interval | true | covered |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in ope:
            lines.append(f"| {row['run']} | {row['impressions']} ({row['heldout_part']}) | {row['policy']} | "
                         f"{row['estimator']} | {_fmt(row['estimate'])} | "
                         f"[{_fmt(row['lo'])}, {_fmt(row['hi'])}] | {_fmt(row['true'])} | {'yes' if row['covered'] else 'no'} |")
        lines += ["", f"{sum(r['covered'] for r in ope)} of {len(ope)} intervals hold the true value.", ""]
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
    lines += ["## Where to look next", "",
              "- `make mlflow-ui` — every daily run: params, OPE metrics, plots, the model card; the `keyart-artwork` "
              "registered model with its `champion` / `challenger` aliases.",
              "- `make airflow-ui` — the `keyart_daily` DAG and its runs, task by task, with logs.",
              f"- `make serve` — the endpoint (this demo's ran at {endpoint_url}); `POST /v1/artwork`, `/metrics`, `/docs`.",
              f"- The lake: `{lake.root}` (raw logs, clean partitions, quarantine, features, priors, run folders).", "",
              "## Step times", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {label} | {sec:.1f} |" for label, sec in step_times]
    report = out / "demo.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "demo.json").write_text(json.dumps({"days": [asdict(r) for r in results], "ope": ope, "shares": shares}, indent=2))
    return report
