"""Builders for MLflow tests: a real run directory ``runs/ds=D/`` as the model steps write it.

A run directory holds ``model.txt`` (a small real LightGBM model), ``train.json``,
``evaluation.json`` (docs/architecture.md shapes, figures computed on a synthetic held-out
day) and ``bundle/`` (the model exported to ONNX by onnxmltools, real Parquet tables and a
manifest written by :func:`keyart.bundle.write_manifest`).

The synthetic world: every impression offers ``K`` candidate artworks with random
features; the chance of a quality play rises with feature 0 and 1 of the candidate.
Logging is uniform, so SNIPS/IPS of a greedy policy are unbiased and a model trained on
shuffled labels (``quality="bad"``) is measurably worse than a good one.

The lake also gets the day's tables (:func:`write_lake_tables`: catalog, priors, member
snapshot), which export and the gate's table refresh read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

from keyart import bundle, contracts, feature_spec
from keyart.lake import Lake, shift_ds
from keyart.net import free_port
from keyart.scoring import OnnxScorer

K = 4  # candidates per impression
N_TRAIN = 3000
N_HELDOUT = 1500
PARAMS = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 20,
          "num_threads": 1, "seed": 7, "deterministic": True, "force_col_wise": True, "verbose": -1}


def _p_true(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(-2.0 + 2.5 * x[..., 0] - 2.0 * x[..., 1])))


@dataclass(frozen=True)
class HeldOut:
    """A uniformly logged held-out day: candidates [n, K, F], shown arm and reward [n]."""

    x: np.ndarray
    shown: np.ndarray
    reward: np.ndarray


def heldout_day(seed: int = 99) -> HeldOut:
    rng = np.random.default_rng(seed)
    x = rng.random((N_HELDOUT, K, feature_spec.N_FEATURES), dtype=np.float32)
    shown = rng.integers(0, K, N_HELDOUT)
    p = _p_true(x[np.arange(N_HELDOUT), shown])
    return HeldOut(x, shown, (rng.random(N_HELDOUT) < p).astype(float))


def train_booster(seed: int, quality: str = "good") -> lgb.Booster:
    """A small real reward model; ``quality='bad'`` learns from shuffled labels."""
    rng = np.random.default_rng(seed)
    x = rng.random((N_TRAIN, feature_spec.N_FEATURES), dtype=np.float32)
    y = (rng.random(N_TRAIN) < _p_true(x)).astype(float)
    if quality == "bad":
        y = rng.permutation(y)
    data = lgb.Dataset(x, y, feature_name=list(feature_spec.FEATURE_NAMES))
    return lgb.train(PARAMS, data, num_boost_round=30)


def _estimate(values: np.ndarray, weights: np.ndarray, self_normalised: bool) -> dict[str, float]:
    n = len(values)
    if self_normalised:
        est = float((weights * values).sum() / max(weights.sum(), 1e-12))
        se = float(np.sqrt(((weights * (values - est)) ** 2).sum()) / max(weights.sum(), 1e-12))
    else:
        terms = weights * values
        est, se = float(terms.mean()), float(terms.std(ddof=1) / np.sqrt(n))
    return {"estimate": est, "lo": est - 1.96 * se, "hi": est + 1.96 * se}


def _dr_terms(held: HeldOut, chosen: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Doubly robust terms of a deterministic policy: q of its arm plus the weighted residual."""
    rows = np.arange(len(held.shown))
    w = (chosen == held.shown) * float(K)
    return q[rows, chosen] + w * (held.reward - q[rows, held.shown])


def _value(held: HeldOut, chosen: np.ndarray, q: np.ndarray, on_policy: bool = False) -> dict[str, dict[str, float]]:
    """Replay/IPS/SNIPS/DR of a deterministic policy (chosen arm [n]) on uniform logs; ``q``
    [n, K] the candidate's predictions (DR's reward model).

    ``on_policy`` values the logging policy itself (importance weights 1; DR is its mean reward).
    """
    match = (chosen == held.shown).astype(float)
    w = np.ones_like(match) if on_policy else match * K
    replay = _estimate(held.reward[match > 0], np.ones(int(match.sum())), self_normalised=True)
    return {"replay": replay, "ips": _estimate(held.reward, w, False),
            "snips": _estimate(held.reward, w, True),
            "dr": _estimate(held.reward if on_policy else _dr_terms(held, chosen, q), np.ones_like(match), False)}


def _difference(held: HeldOut, a: np.ndarray, b: np.ndarray, q: np.ndarray) -> dict[str, dict[str, float]]:
    """Paired IPS/SNIPS/DR difference V_a - V_b of two deterministic policies (linearised intervals)."""
    w_a, w_b = (a == held.shown) * float(K), (b == held.shown) * float(K)
    n = len(held.shown)
    out = {"dr": _estimate(_dr_terms(held, a, q) - _dr_terms(held, b, q), np.ones(n), False)}
    for name in ("ips", "snips"):
        if name == "ips":
            est = float((w_a * held.reward).mean() - (w_b * held.reward).mean())
            d = (w_a - w_b) * held.reward
        else:
            va = (w_a * held.reward).sum() / max(w_a.sum(), 1e-12)
            vb = (w_b * held.reward).sum() / max(w_b.sum(), 1e-12)
            est = float(va - vb)
            d = w_a * (held.reward - va) / max(w_a.mean(), 1e-12) - w_b * (held.reward - vb) / max(w_b.mean(), 1e-12)
        se = float(d.std(ddof=1) / np.sqrt(n))
        out[name] = {"estimate": est, "lo": est - 1.96 * se, "hi": est + 1.96 * se}
    return out


def predictions(booster: lgb.Booster, held: HeldOut) -> np.ndarray:
    n = len(held.shown)
    return booster.predict(held.x.reshape(n * K, -1)).reshape(n, K)


def greedy_choice(booster: lgb.Booster, held: HeldOut) -> np.ndarray:
    return predictions(booster, held).argmax(axis=1)


@dataclass(frozen=True)
class Champion:
    """The champion a day is evaluated against: its model and its bundle version."""

    booster: lgb.Booster
    bundle_version: str


def evaluation(booster: lgb.Booster, champion: Champion | None, held: HeldOut,
               heldout_ds: str, rich: bool = False) -> dict:
    """evaluation.json for a candidate (and the champion, when there is one).

    ``rich`` adds the optional plot inputs (calibration, per-title lift, artwork share).
    """
    n = len(held.shown)
    rng = np.random.default_rng(3)
    q = predictions(booster, held)
    cand = q.argmax(axis=1)
    policies = {
        "candidate": _value(held, cand, q),
        "logging": _value(held, held.shown, q, on_policy=True),
        "random": _value(held, rng.integers(0, K, n), q),
        "noncontextual": _value(held, np.zeros(n, dtype=int), q),
    }
    info: dict = {"source": "no champion registered"}
    difference = {}
    if champion is not None:
        champ = greedy_choice(champion.booster, held)
        policies["champion"] = _value(held, champ, q)
        difference = {"candidate_minus_champion": _difference(held, cand, champ, q)}
        info = {"source": "registry", "bundle_version": champion.bundle_version}
    base = policies["logging"]["snips"]["estimate"]
    lift = {p: {e: {k: v / base - 1.0 for k, v in iv.items()} for e, iv in by_est.items()}
            for p, by_est in policies.items() if p != "logging"}
    out = {
        "ds": shift_ds(heldout_ds, 1), "heldout_ds": heldout_ds, "n_impressions": n,
        "logging_policies": ["random"], "champion": info, "policies": policies, "lift": lift,
        **({"difference": difference} if difference else {}),
        "timings": {"load_s": 0.2, "score_s": 0.1, "ope_s": 0.4},
    }
    if rich:
        p = booster.predict(held.x[np.arange(n), held.shown])
        bins = np.clip((p * 5).astype(int), 0, 4)
        used = [b for b in range(5) if (bins == b).any()]
        out["calibration"] = {"predicted": [float(p[bins == b].mean()) for b in used],
                              "observed": [float(held.reward[bins == b].mean()) for b in used],
                              "count": [int((bins == b).sum()) for b in used]}
        out["per_title_lift"] = {f"t{i:04d}": {"estimate": 0.1 * (i - 1), "lo": 0.1 * (i - 2),
                                               "hi": 0.1 * i} for i in range(3)}
        out["artwork_share"] = {pol: {f"t0000-a{j}": float(np.mean(ch == j)) for j in range(K)}
                                for pol, ch in (("candidate", cand), ("logging", held.shown))}
    return out


def export_onnx(booster: lgb.Booster, path: Path) -> float:
    """Write model.onnx (input 'features', output 'probabilities'); return max |dp|."""
    onx = convert_lightgbm(booster, initial_types=[(bundle.INPUT_NAME, FloatTensorType([None, feature_spec.N_FEATURES]))],
                           zipmap=False, target_opset=15)
    graph = onx.graph
    prob = next(o for o in graph.output if o.name != "label")
    for out in [o for o in graph.output if o.name == "label"]:
        graph.output.remove(out)
    for node in graph.node:
        node.output[:] = [bundle.OUTPUT_NAME if o == prob.name else o for o in node.output]
    prob.name = bundle.OUTPUT_NAME
    path.write_bytes(onx.SerializeToString())
    x = np.random.default_rng(0).random((256, feature_spec.N_FEATURES), dtype=np.float32)
    onnx_p = OnnxScorer(path).predict(x)
    return float(np.abs(onnx_p - booster.predict(x)).max())


def probe(booster: lgb.Booster, n: int = 16) -> dict:
    """Manifest probe rows: feature rows and the native model's P(quality play)."""
    x = np.random.default_rng(5).random((n, feature_spec.N_FEATURES), dtype=np.float32)
    return {"features": x.tolist(), "scores": [float(v) for v in booster.predict(x)], "source": "lightgbm"}


TITLES = [f"t{i:04d}" for i in range(3)]
FIRST_ACTIVE = dt.date(2026, 10, 1)


def write_lake_tables(lake_root: Path, ds: str, launches: dict[str, str] | None = None,
                      rate: float = 0.05) -> None:
    """The catalog (titles, artworks) and the day's priors and member snapshot in the lake.

    ``launches`` maps extra artwork ids (``t0000-new``) to their first active day; the priors
    of ``ds`` give rows only to artworks active on ``ds`` (as the priors job does), with
    posterior means spread around ``rate``.
    """
    lake = Lake(lake_root)
    launches = launches or {}
    arts = [{"artwork_id": f"{t}-a{j}", "title_id": t, "tags": ["tone:drama"], "is_default": j == 0,
             "active_from": FIRST_ACTIVE, "active_to": None} for t in TITLES for j in range(K)]
    arts += [{"artwork_id": a, "title_id": a.split("-")[0], "tags": ["tone:drama"], "is_default": False,
              "active_from": dt.date.fromisoformat(day), "active_to": None} for a, day in launches.items()]
    titles = [{"title_id": t, "name": t, "genres": ["drama"], "cast": [], "maturity_rating": "PG"} for t in TITLES]
    for path, rows, contract in ((lake.titles, titles, contracts.TITLES), (lake.artworks, arts, contracts.ARTWORKS)):
        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, contract.arrow_schema()), path / "part-0.parquet")
    day = dt.date.fromisoformat(ds)
    priors = [{"title_id": a["title_id"], "artwork_id": a["artwork_id"], "segment": "all",
               "alpha": 40.0 * rate * (1 + 0.2 * (i % 3 - 1)), "beta": 40.0 * (1 - rate * (1 + 0.2 * (i % 3 - 1))),
               "n_impressions": 40.0}
              for i, a in enumerate(arts) if a["active_from"] <= day]
    lake.priors(ds).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(priors, contracts.PRIORS.arrow_schema()), lake.priors(ds) / "part-0.parquet")
    members = pa.table({"member_id": ["m000001", "m000002", f"m-{ds}"], "member_is_kids": [0, 1, 0],
                        "member_log_plays_28d": [1.2, 0.0, 0.5], "member_days_since_last_play": [2.0, 365.0, 0.0],
                        "affinity_tags": [["genre:drama"], [], []], "affinity_values": [[1.0], [], []]})
    lake.member_features(ds).mkdir(parents=True, exist_ok=True)
    pq.write_table(members, lake.member_features(ds) / "part-0.parquet")


def _tables(bundle_dir: Path, ds: str) -> None:
    titles = TITLES
    arts = [(t, f"{t}-a{j}") for t in titles for j in range(K)]
    pq.write_table(pa.Table.from_pylist(
        [{"title_id": t, "artwork_id": a, "segment": "all", "alpha": 2.0, "beta": 18.0,
          "n_impressions": 20.0} for t, a in arts], schema=contracts.PRIORS.arrow_schema()),
        bundle_dir / "priors.parquet")
    pq.write_table(pa.table({"member_id": ["m000001", "m000002"], "member_is_kids": [0, 1],
                             "member_log_plays_28d": [1.2, 0.0],
                             "member_days_since_last_play": [2.0, 365.0],
                             "affinity_tags": [["genre:drama"], []], "affinity_values": [[1.0], []]}),
                   bundle_dir / "members.parquet")
    pq.write_table(pa.table({"artwork_id": [a for _, a in arts], "title_id": [t for t, _ in arts],
                             "tags": [["tone:drama"] for _ in arts],
                             "is_default": [a.endswith("a0") for _, a in arts],
                             "title_genres": [["drama"] for _ in arts]}),
                   bundle_dir / "artworks.parquet")


def write_training_partitions(lake_root: Path, days: list[str], rows: int = 64) -> None:
    """Small real ``training/ds=D`` Parquet partitions (the lineage register logs as MLflow
    datasets reads their files and footers, not their values)."""
    lake = Lake(lake_root)
    for i, day in enumerate(days):
        part = lake.training(day)
        part.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        pq.write_table(pa.table({"event_id": [f"e-{day}-{j}" for j in range(rows)],
                                 "artwork_id": [f"t0000-a{j % K}" for j in range(rows)],
                                 "reward": rng.integers(0, 2, rows)}), part / "part-0.parquet")


def build_run_dir(lake_root: Path, ds: str, *, seed: int, quality: str = "good",
                  champion: Champion | None = None, parity_passed: bool = True,
                  held: HeldOut | None = None, rich: bool = False,
                  launches: dict[str, str] | None = None) -> tuple[Path, Champion]:
    """Write ``runs/ds=<ds>/`` and the day's lake tables under ``lake_root``; return the run
    directory and (model, bundle version)."""
    lake = Lake(lake_root)
    write_lake_tables(lake_root, ds, launches)
    run_dir = lake.run_dir(ds)
    bdir = lake.bundle_dir(ds)
    bdir.mkdir(parents=True, exist_ok=True)
    booster = train_booster(seed, quality)
    booster.save_model(str(run_dir / "model.txt"))
    heldout_ds = shift_ds(ds, -1)
    days = [shift_ds(heldout_ds, -i) for i in range(3, 0, -1)]
    write_training_partitions(lake_root, [*days, heldout_ds])
    imp = booster.feature_importance("gain")
    train = {
        "params": {**PARAMS, "num_boost_round": 30},
        "feature_spec_version": feature_spec.FEATURE_SPEC_VERSION,
        "feature_names": list(feature_spec.FEATURE_NAMES),
        "metrics": {"train": {"auc": 0.7, "logloss": 0.5}, "valid": {"auc": 0.68, "logloss": 0.52}},
        "rows": {"train": N_TRAIN, "valid": 500},
        "best_iteration": 30,
        "ds": ds,
        "window": {"days": days, "first_ds": days[0], "last_ds": days[-1], "window_days": 3},
        "heldout_ds": heldout_ds,
        "feature_importance": dict(zip(feature_spec.FEATURE_NAMES, map(float, imp), strict=True)),
        "timings": {"fit_s": 1.5, "read_s": 0.3},
    }
    (run_dir / "train.json").write_text(json.dumps(train, indent=2))
    ev = evaluation(booster, champion, held or heldout_day(), heldout_ds, rich=rich)
    (run_dir / "evaluation.json").write_text(json.dumps(ev, indent=2))
    max_diff = export_onnx(booster, bdir / bundle.MODEL_FILE)
    (bdir / "feature_spec.json").write_text(json.dumps(feature_spec.spec_dict()))
    _tables(bdir, ds)
    manifest = bundle.write_manifest(
        bdir,
        bundle_version=f"{ds}.s{seed}{quality[0]}",
        created_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC).isoformat(),
        ds=ds,
        priors_ds=ds,
        probe=probe(booster),
        training_window=train["window"],
        heldout_ds=heldout_ds,
        policy={"name": "squarecb", "gamma": 400.0, "floor": 0.02, "prior_blend_n0": 50.0},
        metrics={"train": train["metrics"]},
        parity={"rows": 256, "max_abs_diff": max_diff, "greedy_agreement": 1.0, "tolerance": 1e-5,
                "passed": parity_passed},
    )
    return run_dir, Champion(booster, manifest.version)


# --- mlflow servers started by the tests ---------------------------------------------------

def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> None:
    """Wait until ``url/health`` answers; fail the test with the server's log if the server
    exits or stays unhealthy (it is stopped then)."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    pytest.fail(f"mlflow server not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}", pytrace=False)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`start_mlflow_server` and its workers (the process
    group it leads)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class ArtifactServer:
    """An ``mlflow server`` on a local port, started by :func:`start_mlflow_server`."""

    url: str
    proc: subprocess.Popen
    log_path: Path


def start_mlflow_server(args: list[str], log_path: Path, cwd: Path | None = None,
                        timeout_s: float = 90.0) -> ArtifactServer:
    """``mlflow server <args>`` of this environment on a free loopback port, in a process
    group of its own, run from ``cwd`` (default: the log's folder; the server creates an
    empty ``./mlruns`` where it runs). Returns once ``/health`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", *args,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True, cwd=cwd or log_path.parent)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log_path, timeout_s)
    return ArtifactServer(url, proc, log_path)


def start_artifact_server(backend_uri: str, destination: Path, log_path: Path, timeout_s: float = 90.0) -> ArtifactServer:
    """``mlflow server --serve-artifacts``: runs get ``mlflow-artifacts:/`` locations, resolved
    by the server against its ``--artifacts-destination``."""
    return start_mlflow_server(["--backend-store-uri", backend_uri, "--serve-artifacts",
                                "--artifacts-destination", destination.as_uri(),
                                "--default-artifact-root", "mlflow-artifacts:/"], log_path, timeout_s=timeout_s)


def chromium_dom(url: str, screenshot: Path | None = None, budget_ms: int = 10000, timeout_s: float = 90.0) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts for ``budget_ms`` of
    virtual time (single-page apps render by then); also a screenshot when asked."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", "--window-size=1400,1100"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout_s, check=False)
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s, check=True)
    return done.stdout
