"""Reviewer artifacts of a daily run: plots and a short Markdown model card.

Everything is drawn from the run directory (``train.json``, ``evaluation.json``,
``model.txt``, ``bundle/manifest.json``). A figure whose input is absent is skipped with a
note (kept in the card), never an error: the registry step must not fail on a missing plot.

Optional inputs read (besides the documented OPE and lift fields):

* ``evaluation.json["calibration"]``: ``{"predicted": [...], "observed": [...], "count": [...]}``
  per score bin (or the same under ``train.json["calibration"]``);
* ``evaluation.json["per_title_lift"]`` or ``evaluation.json["lift"]["per_title"]``:
  ``{title_id: lift}`` or ``{title_id: {"estimate", "lo", "hi"}}``;
* ``evaluation.json["artwork_share"]``: ``{policy: {artwork_id: share of impressions}}``;
* ``train.json["feature_importance"]``: ``{feature: gain}`` (else read from ``model.txt``).

The paired difference V_challenger - V_champion (``evaluation.json["difference"]``) is what
the promotion gate decides on: :func:`difference_plot` draws it per estimator against 0 and
-delta, :func:`comparison_rows` tabulates challenger, champion and difference, and
:func:`model_card` opens with the gate's decision once it is known (``decision``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keyart.config import DEFAULT_PROMOTION_ESTIMATOR  # noqa: E402
from keyart.ope import ESTIMATORS  # noqa: E402

log = logging.getLogger(__name__)

POLICIES = ("candidate", "champion", "logging", "random", "noncontextual")
SHARE_POLICIES = ("candidate", "champion", "logging")
TOP_N = 25
DIFFERENCE_KEY = "candidate_minus_champion"


@dataclass
class Report:
    """Files written for a run, and notes on what could not be drawn."""

    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    card: Path | None = None


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def take_rate_plot(evaluation: Mapping[str, Any], out: Path) -> Path | str:
    """Estimated take rate per policy and estimator, with interval bars."""
    policies = evaluation.get("policies") or {}
    rows = [(p, e, policies[p][e]) for p in POLICIES if isinstance(policies.get(p), Mapping)
            for e in ESTIMATORS if isinstance(policies[p].get(e), Mapping)
            and policies[p][e].get("estimate") is not None]
    if not rows:
        return "take rate by policy: evaluation.json has no policy estimates"
    estimators = [e for e in ESTIMATORS if any(r[1] == e for r in rows)]
    names = [p for p in POLICIES if any(r[0] == p for r in rows)]
    width = 0.8 / len(estimators)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, est in enumerate(estimators):
        xs, ys, err = [], [], [[], []]
        for i, pol in enumerate(names):
            cell = (policies.get(pol) or {}).get(est)
            if not isinstance(cell, Mapping) or cell.get("estimate") is None:
                continue
            y = float(cell["estimate"])
            xs.append(i + j * width)
            ys.append(y)
            err[0].append(max(0.0, y - float(cell.get("lo", y))))
            err[1].append(max(0.0, float(cell.get("hi", y)) - y))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=est)
    ax.set_xticks([i + width * (len(estimators) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("take rate (quality plays / impression)")
    ax.set_title(f"Offline estimates on held-out day {evaluation.get('heldout_ds', '?')}")
    ax.legend(title="estimator")
    return _save(fig, out)


def calibration_plot(evaluation: Mapping[str, Any], train: Mapping[str, Any], out: Path) -> Path | str:
    """Observed vs predicted take rate per score bin."""
    cal = evaluation.get("calibration") or train.get("calibration")
    if not isinstance(cal, Mapping) or not cal.get("predicted") or not cal.get("observed"):
        return "calibration curve: no 'calibration' {predicted, observed} in evaluation.json or train.json"
    pred, obs = np.asarray(cal["predicted"], float), np.asarray(cal["observed"], float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    hi = float(max(pred.max(), obs.max(), 1e-3)) * 1.05
    ax.plot([0, hi], [0, hi], ls="--", color="grey", lw=1)
    sizes = np.asarray(cal.get("count") or [20] * len(pred), float)
    ax.scatter(pred, obs, s=20 + 200 * sizes / max(sizes.max(), 1.0))
    ax.plot(pred, obs)
    ax.set_xlabel("predicted P(quality play)")
    ax.set_ylabel("observed rate")
    ece = cal.get("ece")
    ax.set_title("Calibration" + (f" (ECE {float(ece):.4f})" if isinstance(ece, int | float) else ""))
    return _save(fig, out)


def _per_title(evaluation: Mapping[str, Any]) -> dict[str, Any] | None:
    lift = evaluation.get("lift")
    found = evaluation.get("per_title_lift") or (lift.get("per_title") if isinstance(lift, Mapping) else None)
    if isinstance(found, list):  # [{"title_id": .., "estimate"|"lift": ..}, ...]
        found = {str(r.get("title_id")): r for r in found if isinstance(r, Mapping)}
    return found if isinstance(found, Mapping) and found else None


def per_title_lift_plot(evaluation: Mapping[str, Any], out: Path) -> Path | str:
    """Candidate minus logging take rate per title, with intervals: the titles with the most
    held-out impressions when their counts are known, else the largest |lift|."""
    per_title = _per_title(evaluation)
    if per_title is None:
        return "per-title lift: no 'per_title_lift' (or lift.per_title) in evaluation.json"
    rows = []
    for title, v in per_title.items():
        if isinstance(v, Mapping):
            y = v.get("estimate", v.get("lift"))
            lo, hi = v.get("lo", y), v.get("hi", y)
            n = v.get("impressions")
        else:
            y = lo = hi = v
            n = None
        if y is not None:
            rows.append((str(title), float(y), float(lo), float(hi), n))
    if not rows:
        return "per-title lift: no title has an estimate"
    by_size = all(r[4] is not None for r in rows)
    rows = sorted(rows, key=(lambda r: -r[4]) if by_size else (lambda r: -abs(r[1])))[:TOP_N][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ys = np.arange(len(rows))
    vals = np.array([r[1] for r in rows])
    err = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]).clip(min=0)
    ax.barh(ys, vals, xerr=err, color=["tab:green" if v >= 0 else "tab:red" for v in vals], capsize=2)
    ax.set_yticks(ys, [f"{r[0]} (n={r[4]})" if r[4] is not None else r[0] for r in rows], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("candidate − logging take rate (SNIPS, 95% paired interval)")
    ax.set_title(f"Per-title lift, {len(rows)} titles " + ("with the most impressions" if by_size else "largest first"))
    return _save(fig, out)


def artwork_share_plot(evaluation: Mapping[str, Any], out: Path) -> Path | str:
    """Share of impressions per artwork under each policy (most shown first)."""
    share = evaluation.get("artwork_share")
    if not isinstance(share, Mapping) or not share:
        return "share of impressions per artwork: no 'artwork_share' in evaluation.json"
    policies = [p for p in share if isinstance(share[p], Mapping) and share[p]]
    if any(p in SHARE_POLICIES for p in policies):  # the baselines would only crowd the bars
        policies = [p for p in SHARE_POLICIES if p in policies]
    if not policies:
        return "share of impressions per artwork: 'artwork_share' is empty"
    total: dict[str, float] = {}
    for p in policies:
        for art, s in share[p].items():
            total[art] = total.get(art, 0.0) + float(s)
    arts = sorted(total, key=lambda a: -total[a])[:TOP_N]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(arts) + 2), 4))
    width = 0.8 / len(policies)
    for j, p in enumerate(policies):
        ax.bar(np.arange(len(arts)) + j * width, [float(share[p].get(a, 0.0)) for a in arts], width, label=p)
    ax.set_xticks(np.arange(len(arts)) + width * (len(policies) - 1) / 2, arts, rotation=60, ha="right")
    ax.set_ylabel("share of impressions")
    ax.set_title(f"Share of impressions per artwork (top {len(arts)})")
    ax.legend()
    return _save(fig, out)


def _cell(evaluation: Mapping[str, Any], section: str, name: str, est: str) -> Mapping[str, Any] | None:
    cell = ((evaluation.get(section) or {}).get(name) or {}).get(est)
    return cell if isinstance(cell, Mapping) and cell.get("estimate") is not None else None


def comparison_rows(evaluation: Mapping[str, Any], noninferiority_margin: float,
                    gate_estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> list[dict[str, Any]]:
    """Challenger (the run's candidate) beside the champion, per estimator: both values and
    the paired difference with their 95% intervals, and -delta (delta = margin x the
    champion's value), the bound the gate holds the difference's lower end against.
    Empty when no champion was valued."""
    rows = []
    for est in ESTIMATORS:
        cand = _cell(evaluation, "policies", "candidate", est)
        champ = _cell(evaluation, "policies", "champion", est)
        diff = _cell(evaluation, "difference", DIFFERENCE_KEY, est)
        if cand is None or champ is None:
            continue
        v = float(champ["estimate"])
        delta = noninferiority_margin * v if v > 0 else 0.0
        row: dict[str, Any] = {"estimator": est, "gate_reads": est == gate_estimator}
        for label, c in (("challenger", cand), ("champion", champ), ("difference", diff)):
            for k in ("estimate", "lo", "hi"):
                row[f"{label}_{k}"] = float(c[k]) if c is not None and c.get(k) is not None else None
        row["minus_delta"] = -delta
        rows.append(row)
    return rows


def difference_plot(evaluation: Mapping[str, Any], out: Path, noninferiority_margin: float,
                    decision: Mapping[str, Any] | None = None, gate_estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> Path | str:
    """The paired difference challenger − champion per estimator with its interval, against
    0 (hard block when the whole interval is below it) and −delta (the non-inferiority
    bound); the gate's pooled interval too, once the gate has run."""
    rows = [r for r in comparison_rows(evaluation, noninferiority_margin, gate_estimator)
            if r["difference_estimate"] is not None]
    if not rows:
        return ("challenger vs champion: no paired difference in evaluation.json "
                "(no champion was valued: the first model is promoted on parity alone)")
    labels = [r["estimator"] + (" (gate)" if r["gate_reads"] else "") for r in rows]
    ests = np.array([r["difference_estimate"] for r in rows])
    los = np.array([r["difference_lo"] for r in rows])
    his = np.array([r["difference_hi"] for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(rows) + 2.2))
    ys = np.arange(len(rows))[::-1].astype(float)
    ax.errorbar(ests, ys, xerr=[(ests - los).clip(min=0), (his - ests).clip(min=0)], fmt="o", capsize=4,
                color="tab:blue", label="today's paired difference, 95%")
    figures = (decision or {}).get("figures") or {}
    if all(k in figures for k in ("pooled", "pooled_lo", "pooled_hi")) and figures.get("pooled_days", 1) > 1:
        y = ys[[r["gate_reads"] for r in rows].index(True)] - 0.25 if any(r["gate_reads"] for r in rows) else ys[0] - 0.25
        p, plo, phi = (float(figures[k]) for k in ("pooled", "pooled_lo", "pooled_hi"))
        ax.errorbar([p], [y], xerr=[[p - plo], [phi - p]], fmt="s", capsize=4, color="tab:purple",
                    label=f"pooled over {int(figures['pooled_days'])} held-out days")
    ax.axvline(0, color="black", lw=0.8)
    minus_delta = [r["minus_delta"] for r in rows]
    for y, md in zip(ys, minus_delta, strict=True):
        ax.plot([md, md], [y - 0.35, y + 0.35], color="tab:red", lw=2)
    ax.plot([], [], color="tab:red", lw=2, label=f"−δ = −{noninferiority_margin:g} × V_champion")
    ax.set_yticks(ys, labels)
    ax.set_xlabel("V_challenger − V_champion (take rate)")
    title = f"Challenger vs champion on held-out day {evaluation.get('heldout_ds', '?')}"
    if decision and decision.get("decision"):
        title += f": {decision['decision']}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out)


def _importance(train: Mapping[str, Any], model_txt: Path) -> dict[str, float] | None:
    imp = train.get("feature_importance")
    if isinstance(imp, Mapping) and imp:
        return {str(k): float(v) for k, v in imp.items()}
    if model_txt.is_file():
        try:
            import lightgbm as lgb

            booster = lgb.Booster(model_file=str(model_txt))
            return dict(zip(booster.feature_name(), map(float, booster.feature_importance("gain")), strict=True))
        except Exception as exc:  # a damaged model file must not stop registration
            log.warning("cannot read feature importance from %s: %s", model_txt, exc)
    return None


def feature_importance_plot(train: Mapping[str, Any], model_txt: Path, out: Path) -> Path | str:
    """Total gain per feature (top features)."""
    imp = _importance(train, model_txt)
    if not imp:
        return "feature importance: no 'feature_importance' in train.json and no readable model.txt"
    top = sorted(imp.items(), key=lambda kv: -kv[1])[:TOP_N][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(top) + 1.5))
    ax.barh([k for k, _ in top], [v for _, v in top])
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance")
    return _save(fig, out)


def make_plots(run_dir: Path, train: Mapping[str, Any], evaluation: Mapping[str, Any],
               out_dir: Path, noninferiority_margin: float = 0.05,
               decision: Mapping[str, Any] | None = None, gate_estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> Report:
    """Draw every plot into ``out_dir``; a plot that cannot be drawn becomes a note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Callable[[Path], Path | str]]] = [
        ("challenger_vs_champion.png", lambda p: difference_plot(evaluation, p, noninferiority_margin, decision,
                                                                         gate_estimator)),
        ("take_rate_by_policy.png", lambda p: take_rate_plot(evaluation, p)),
        ("calibration.png", lambda p: calibration_plot(evaluation, train, p)),
        ("per_title_lift.png", lambda p: per_title_lift_plot(evaluation, p)),
        ("artwork_share.png", lambda p: artwork_share_plot(evaluation, p)),
        ("feature_importance.png", lambda p: feature_importance_plot(train, run_dir / "model.txt", p)),
    ]
    report = Report()
    for name, draw in jobs:
        try:
            result = draw(out_dir / name)
        except Exception as exc:  # malformed optional input: note it, keep going
            result = f"{name}: could not be drawn ({type(exc).__name__}: {exc})"
            plt.close("all")
        if isinstance(result, Path):
            report.plots.append(result)
        else:
            report.notes.append(result)
    return report


def _fmt(x: Any) -> str:
    if isinstance(x, float) and x != 0 and abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}" if isinstance(x, int | float) else "–"


def _iv(c: Mapping[str, Any], prefix: str, signed: bool = False) -> str:
    e, lo, hi = (c.get(f"{prefix}_{k}") for k in ("estimate", "lo", "hi"))
    if e is None:
        return "–"
    f = "{:+.5f}" if signed else "{:.5f}"
    return f"{f.format(e)} [{f.format(lo)}, {f.format(hi)}]" if lo is not None and hi is not None else f.format(e)


def decision_lines(decision: Mapping[str, Any] | None) -> list[str]:
    """The card's opening section: the gate's decision and reason, or that it is pending."""
    lines = ["## Decision", ""]
    if not decision or not decision.get("decision"):
        return lines + ["Pending: registered as `@challenger`; `keyart gate` has not decided yet. "
                        "Its decision and reason will replace this paragraph.", ""]
    lines.append(f"**{decision['decision']}** (version {decision.get('version', '?')}, "
                 f"decided by the gate at {decision.get('at', '?')})")
    lines += ["", f"> {decision.get('reason', '')}", ""]
    extra = [(k.replace("_", " "), decision.get(k)) for k in ("champion_before", "champion_after", "published")]
    lines += [f"- {k}: `{v}`" for k, v in extra if v]
    if decision.get("publish_note"):
        lines.append(f"- tables: {decision['publish_note']}")
    lines.append("")
    return lines


def comparison_lines(rows: list[dict[str, Any]], noninferiority_margin: float,
                     gate_estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> list[str]:
    """The challenger-vs-champion table of the card."""
    lines = ["## Challenger vs champion", ""]
    if not rows:
        return lines + ["No champion was valued on the held-out day (none was registered), so there is no "
                        "paired difference: the first model is promoted on parity alone.", ""]
    lines += ["| estimator | challenger | champion | difference (paired) | −δ |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['estimator']}** (gate)" if r["gate_reads"] else r["estimator"]
        lines.append(f"| {name} | {_iv(r, 'challenger')} | {_iv(r, 'champion')} | "
                     f"{_iv(r, 'difference', signed=True)} | {r['minus_delta']:+.5f} |")
    lines += ["", f"Values are take rates with 95% bootstrap intervals; the difference is paired (both "
              f"policies on the same resampled impressions). The gate reads {gate_estimator}: a fresher "
              f"challenger is promoted unless the difference's lower bound (or that of the difference pooled "
              f"over recent held-out days) is at or below −δ, δ = {noninferiority_margin:g} × V_champion; "
              "an upper bound below 0 always blocks. See `plots/challenger_vs_champion.png`.", ""]
    return lines


def model_card(*, ds: str, manifest: Mapping[str, Any], train: Mapping[str, Any],
               evaluation: Mapping[str, Any], lineage: Mapping[str, Any],
               notes: list[str], decision: Mapping[str, Any] | None = None,
               noninferiority_margin: float = 0.05, gate_estimator: str = DEFAULT_PROMOTION_ESTIMATOR) -> str:
    """A short Markdown model card for the run and its registered version: the gate's
    decision first (pending until the gate runs), then challenger vs champion, identity,
    training, the offline evaluation of every policy and ONNX parity."""
    policy = manifest.get("policy")
    policy_name = policy.get("name", "configured") if isinstance(policy, Mapping) else (policy or "configured")
    lines = [
        f"# keyart-artwork — daily model for ds={ds}", "",
        "LightGBM reward model P(quality play | member, context, title, artwork) behind the "
        f"`{policy_name}` exploration policy; exported to ONNX and shipped as a bundle.", "",
    ]
    lines += decision_lines(decision)
    if decision and decision.get("estimator"):  # what the gate actually read
        gate_estimator = str(decision["estimator"])
    lines += comparison_lines(comparison_rows(evaluation, noninferiority_margin, gate_estimator),
                              noninferiority_margin, gate_estimator)
    lines += [
        "## Identity", "",
        f"- bundle version: `{manifest.get('bundle_version')}`",
        f"- feature spec version: `{manifest.get('feature_spec_version')}`",
    ]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in lineage.items()
              if k not in ("bundle_version", "feature_spec_version")]
    metrics = train.get("metrics") or {}
    lines += ["", "## Training", ""]
    rows = train.get("rows")
    if isinstance(rows, Mapping) and rows:
        lines.append("- rows: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    for split, vals in metrics.items() if isinstance(metrics, Mapping) else []:
        if isinstance(vals, Mapping):
            lines.append(f"- {split}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()))
    cal = evaluation.get("calibration")
    if isinstance(cal, Mapping) and isinstance(cal.get("ece"), int | float):
        lines.append(f"- calibration on the held-out day: expected calibration error {cal['ece']:.4f}")
    lines += ["", f"## Offline evaluation (held-out day {evaluation.get('heldout_ds', '?')}, "
              f"{evaluation.get('n_impressions', '?')} impressions)", "",
              "| policy | " + " | ".join(ESTIMATORS) + " |", "|---" * (len(ESTIMATORS) + 1) + "|"]
    policies = evaluation.get("policies") or {}
    for pol in POLICIES:
        cells = policies.get(pol)
        if not isinstance(cells, Mapping):
            lines.append(f"| {pol} | " + " | ".join("–" for _ in ESTIMATORS) + " |")
            continue
        row = []
        for est in ESTIMATORS:
            c = cells.get(est)
            row.append(f"{_fmt(c.get('estimate'))} [{_fmt(c.get('lo'))}, {_fmt(c.get('hi'))}]"
                       if isinstance(c, Mapping) else "–")
        lines.append(f"| {pol} | " + " | ".join(row) + " |")
    lines += ["", "candidate: this run's model (the challenger); champion: the serving model on the same "
              "impressions; logging: what was served (its on-policy mean); random: uniform over the "
              "candidates; noncontextual: per-title Thompson sampling on the Beta priors."]
    same = evaluation.get("candidate_vs_logging")
    if isinstance(same, Mapping) and same.get("same_policy"):
        lines += ["", f"Note: {same.get('note')}."]
    lift = evaluation.get("lift")
    if isinstance(lift, Mapping):
        flat = {k: v for k, v in lift.items() if isinstance(v, int | float)}
        if flat:
            lines += ["", "Lift: " + ", ".join(f"{k} {_fmt(v)}" for k, v in flat.items())]
    parity = manifest.get("parity")
    lines += ["", "## ONNX parity", ""]
    if isinstance(parity, Mapping) and parity:
        lines.append(", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in parity.items()))
    else:
        lines.append("no parity figures in the manifest")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
