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

from keyart.ope import ESTIMATORS  # noqa: E402

log = logging.getLogger(__name__)

POLICIES = ("candidate", "champion", "logging", "random", "noncontextual")
TOP_N = 25


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
    ax.set_title("Calibration")
    return _save(fig, out)


def _per_title(evaluation: Mapping[str, Any]) -> dict[str, Any] | None:
    lift = evaluation.get("lift")
    found = evaluation.get("per_title_lift") or (lift.get("per_title") if isinstance(lift, Mapping) else None)
    if isinstance(found, list):  # [{"title_id": .., "estimate"|"lift": ..}, ...]
        found = {str(r.get("title_id")): r for r in found if isinstance(r, Mapping)}
    return found if isinstance(found, Mapping) and found else None


def per_title_lift_plot(evaluation: Mapping[str, Any], out: Path) -> Path | str:
    """Lift of the candidate over logging per title (largest |lift| first)."""
    per_title = _per_title(evaluation)
    if per_title is None:
        return "per-title lift: no 'per_title_lift' (or lift.per_title) in evaluation.json"
    rows = []
    for title, v in per_title.items():
        if isinstance(v, Mapping):
            y = v.get("estimate", v.get("lift"))
            lo, hi = v.get("lo", y), v.get("hi", y)
        else:
            y = lo = hi = v
        if y is not None:
            rows.append((str(title), float(y), float(lo), float(hi)))
    rows = sorted(rows, key=lambda r: -abs(r[1]))[:TOP_N][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ys = np.arange(len(rows))
    vals = np.array([r[1] for r in rows])
    err = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]).clip(min=0)
    ax.barh(ys, vals, xerr=err, color=["tab:green" if v >= 0 else "tab:red" for v in vals], capsize=2)
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("lift of candidate over logging policy")
    ax.set_title(f"Per-title lift (top {len(rows)} by size)")
    return _save(fig, out)


def artwork_share_plot(evaluation: Mapping[str, Any], out: Path) -> Path | str:
    """Share of impressions per artwork under each policy (most shown first)."""
    share = evaluation.get("artwork_share")
    if not isinstance(share, Mapping) or not share:
        return "share of impressions per artwork: no 'artwork_share' in evaluation.json"
    policies = [p for p in share if isinstance(share[p], Mapping) and share[p]]
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
               out_dir: Path) -> Report:
    """Draw every plot into ``out_dir``; a plot that cannot be drawn becomes a note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Callable[[Path], Path | str]]] = [
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


def model_card(*, ds: str, manifest: Mapping[str, Any], train: Mapping[str, Any],
               evaluation: Mapping[str, Any], lineage: Mapping[str, Any],
               notes: list[str]) -> str:
    """A short Markdown model card for the run and its registered version."""
    policy = manifest.get("policy")
    policy_name = policy.get("name", "configured") if isinstance(policy, Mapping) else (policy or "configured")
    lines = [
        f"# keyart-artwork — daily model for ds={ds}", "",
        "LightGBM reward model P(quality play | member, context, title, artwork) behind the "
        f"`{policy_name}` exploration policy; exported to ONNX and shipped as a bundle.", "",
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
    lines += ["", "## Promotion", "",
              "Registered with alias `challenger`; `keyart gate` decides on `champion` and writes "
              "its decision and reason to this run's tags (`keyart.gate.*`)."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
