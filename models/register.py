"""``keyart register --ds D``: track the day's training as an MLflow run and register its bundle.

Reads ``runs/ds=D/`` (``train.json``, ``evaluation.json``, ``model.txt``, ``bundle/``) and
writes one run in the ``keyart`` experiment:

* params: feature spec and bundle versions, LightGBM parameters (``lgb.*``), policy settings
  (``policy.*``), the data window (``data.*``) and row counts (``rows.*``);
* metrics (:func:`run_metrics`): training metrics (``train.<split>.<metric>``), the OPE
  estimates with bounds of the challenger and the champion
  (``ope.{candidate,champion}.<estimator>.{estimate,lo,hi}``), the baselines' estimates
  (``ope.{logging,random,noncontextual}.<estimator>.estimate``), the paired difference
  (``difference.candidate_minus_champion.*``), the candidate's lift over logging
  (``lift.candidate.*``), ``onnx_parity_error`` and step timings (``timing.<step>.*``);
* inputs: the training days and the held-out day as MLflow datasets (:func:`log_datasets`,
  contexts ``training`` and ``heldout``);
* tags: the Airflow task that ran the step (``keyart.airflow.*``, from ``AIRFLOW_CTX_*``);
* artifacts: ``model_card.md`` (also the run description), ``comparison.json`` (challenger
  vs champion per estimator, an MLflow table), ``train.json``, ``evaluation.json``,
  ``bundle/manifest.json``, ``feature_spec.json``, ``plots/*.png``;
* the bundle as logged model ``bundle`` (mlflow.onnx flavor), registered as a new version of
  ``keyart-artwork`` with lineage tags, a description, status ``registered`` and alias
  ``challenger``.

After the gate, :func:`record_decision` rewrites the model card's decision section, the
difference plot and the version's description, and the version statuses follow the
champion (:func:`champion_changed`).

Idempotent: a bundle already registered for the same ds (same manifest checksum) is not
registered again, so Airflow retries and backfills are safe.

:func:`register_refresh` registers a table refresh (the champion's model.onnx with a later
day's tables, built by :func:`keyart.models.export.refresh_bundle` when the gate keeps the
champion) as a version of kind ``table_refresh``: one per (day, model), never ``challenger``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow

from keyart import bundle, policy, registry
from keyart.config import Settings
from keyart.config import settings as default_settings
from keyart.lake import Lake, fmt_ds
from keyart.models import report

log = logging.getLogger(__name__)

# Version status (tag keyart.status). Any status means registration finished.
STATUS_REGISTERED = "registered"  # registered, not decided on yet
STATUS_CHAMPION = "champion"  # @champion points here
STATUS_NOT_PROMOTED = "not_promoted"  # the gate kept the champion
STATUS_FORMER = "former_champion"  # was @champion, replaced by a promotion or a table refresh
STATUS_ROLLED_BACK = "rolled_back"  # was @champion, rolled back by a reviewer
LINEAGE_KEYS = ("ds", "kind", "bundle_version", "model_sha256", "tables_ds", "feature_spec_version",
                "data_partitions", "heldout_ds", "logging_policy", "parity_passed", "eval_champion_bundle",
                "source_run")
AIRFLOW_CONTEXT = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID",
                   "task_id": "AIRFLOW_CTX_TASK_ID", "try_number": "AIRFLOW_CTX_TRY_NUMBER",
                   "logical_date": "AIRFLOW_CTX_LOGICAL_DATE"}
COMPARISON_FILE = "comparison.json"
MAX_TAG_CHARS = 7900  # MLflow caps run tag values at 8000 characters
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(key: str) -> str:
    """A key MLflow accepts for params and metrics (other characters become '_')."""
    return _BAD_KEY_CHARS.sub("_", key)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
        return float(value)
    return None


def flatten_numeric(prefix: str, obj: Any, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Numeric leaves of nested mappings as ``prefix.a.b`` -> value (lists are skipped)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if key not in skip:
                out.update(flatten_numeric(f"{prefix}.{key}" if prefix else str(key), value, skip))
    elif (num := _number(obj)) is not None:
        out[metric_key(prefix)] = num
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def is_registered(tags: Mapping[str, str]) -> bool:
    """Registration of the version finished (its last step sets a status)."""
    return bool(tags.get(registry.TAG_STATUS))


def airflow_tags(prefix: str = "keyart.airflow.", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Airflow DAG, run, task and try that run this step (Airflow exports them to the
    task's environment as ``AIRFLOW_CTX_*``); empty outside Airflow."""
    env = os.environ if environ is None else environ
    return {f"{prefix}{k}": env[v] for k, v in AIRFLOW_CONTEXT.items() if env.get(v)}


def run_metrics(train: Mapping[str, Any], evaluation: Mapping[str, Any],
                manifest: Mapping[str, Any]) -> dict[str, float]:
    """The run's metrics: what a reviewer charts across days, not every figure the run
    wrote (those stay in train.json, evaluation.json and the manifest)."""
    metrics = flatten_numeric("train", train.get("metrics"))
    if _number(train.get("best_iteration")) is not None:
        metrics["train.best_iteration"] = float(train["best_iteration"])
    policies = evaluation.get("policies") or {}
    for pol in ("candidate", "champion"):
        metrics.update(flatten_numeric(f"ope.{pol}", policies.get(pol)))
    for pol in ("logging", "random", "noncontextual"):
        for est, cell in (policies.get(pol) or {}).items():
            if isinstance(cell, Mapping) and _number(cell.get("estimate")) is not None:
                metrics[metric_key(f"ope.{pol}.{est}.estimate")] = float(cell["estimate"])
    metrics.update(flatten_numeric("difference", evaluation.get("difference")))
    metrics.update(flatten_numeric("lift.candidate", (evaluation.get("lift") or {}).get("candidate")))
    _, err = parity(manifest)
    if err is not None:
        metrics["onnx_parity_error"] = err
    for step, source in (("train", train), ("evaluate", evaluation), ("export", manifest)):
        metrics.update(flatten_numeric(f"timing.{step}", source.get("timings")))
    return metrics


def parity(manifest: Mapping[str, Any]) -> tuple[bool | None, float | None]:
    """(passed, max |Δp|) from the manifest's ``parity`` figures; None where absent."""
    par = manifest.get("parity")
    if not isinstance(par, Mapping):
        return None, None
    err = _number(par.get("max_abs_diff"))
    passed = par.get("passed")
    return (bool(passed) if passed is not None else None), err


def data_window(train: Mapping[str, Any],
                evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Training partitions, window bounds and held-out day (train.json's ``window``; the
    held-out day evaluation used, else the one training set aside)."""
    window = train.get("window") or {}
    days = [str(d) for d in window.get("days") or []]
    start = window.get("first_ds") or (days[0] if days else None)
    end = window.get("last_ds") or (days[-1] if days else None)
    heldout = evaluation.get("heldout_ds") or train.get("heldout_ds")
    return {"training_days": days, "start": start, "end": end, "heldout_ds": heldout}


def policy_settings(manifest: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """Policy settings the bundle was built with (manifest), else the current configuration."""
    pol = manifest.get("policy")
    if isinstance(pol, Mapping) and pol:
        return dict(pol)
    return {f: getattr(settings, f) for f in policy.SETTINGS_FIELDS.values()}


@dataclass
class RunRecord:
    """What register logs for one ds, read from its run directory."""

    ds: str
    run_dir: Path
    checksum: str
    manifest: dict[str, Any]
    train: dict[str, Any]
    evaluation: dict[str, Any]
    params: dict[str, str]
    metrics: dict[str, float]
    lineage: dict[str, str]


def read_run_dir(run_dir: Path, ds: str, settings: Settings) -> RunRecord:
    """Verify the bundle and collect params, metrics and lineage of ``run_dir``."""
    manifest = bundle.verify(run_dir / "bundle").data
    train = _read_json(run_dir / "train.json")
    evaluation = _read_json(run_dir / "evaluation.json")
    window = data_window(train, evaluation)
    params: dict[str, Any] = {
        "ds": ds,
        "feature_spec_version": manifest.get("feature_spec_version"),
        "bundle_version": manifest.get("bundle_version"),
        "data.training_days": ",".join(window["training_days"]) or None,
        "data.n_training_days": len(window["training_days"]),
        "data.window_start": window["start"],
        "data.window_end": window["end"],
        "data.heldout_ds": window["heldout_ds"],
    }
    lgb_params = train.get("params") or {}
    params.update({f"lgb.{k}": v for k, v in lgb_params.items() if not isinstance(v, Mapping | list)})
    params.update({f"policy.{k}": v for k, v in policy_settings(manifest, settings).items()
                   if not isinstance(v, Mapping | list)})
    rows = flatten_numeric("rows", train.get("rows"))
    if _number(evaluation.get("n_impressions")) is not None:
        rows["rows.heldout_impressions"] = float(evaluation["n_impressions"])
    params.update({k: int(v) for k, v in rows.items()})

    metrics = run_metrics(train, evaluation, manifest)
    passed, _ = parity(manifest)

    logging_policy = evaluation.get("logging_policies")
    champion_info = evaluation.get("champion")
    eval_champion = champion_info.get("bundle_version") if isinstance(champion_info, Mapping) else None
    lineage = {
        "ds": ds,
        "kind": registry.KIND_TRAINED,
        "bundle_version": str(manifest.get("bundle_version")),
        "model_sha256": str(manifest["files"][bundle.MODEL_FILE]),
        "tables_ds": str(manifest.get("priors_ds") or ds),
        "feature_spec_version": str(manifest.get("feature_spec_version")),
        "data_partitions": json.dumps({"training": window["training_days"],
                                       "heldout": window["heldout_ds"]}),
        "heldout_ds": str(window["heldout_ds"]),
        "logging_policy": (json.dumps(logging_policy, sort_keys=True, default=str)
                           if isinstance(logging_policy, Mapping | list) else str(logging_policy or "unknown")),
        "parity_passed": "unknown" if passed is None else str(passed).lower(),
    }
    if eval_champion is not None:
        lineage["eval_champion_bundle"] = str(eval_champion)
    return RunRecord(ds=ds, run_dir=run_dir, checksum=registry.bundle_checksum(run_dir / "bundle"),
                     manifest=manifest, train=train, evaluation=evaluation,
                     params={metric_key(k): str(v) for k, v in params.items() if v is not None},
                     metrics=metrics, lineage=lineage)


@dataclass(frozen=True)
class RegisterResult:
    version: str
    run_id: str
    created: bool


def _maybe_set_challenger(version: str, ds: str, settings: Settings) -> None:
    """Move ``challenger`` here unless it already marks a newer day (a backfill)."""
    current = registry.get_challenger_version(settings)
    if current is not None and current != version:
        current_ds = registry.get_version(current, settings).tags.get(registry.TAG_DS, "")
        if current_ds > ds:
            log.info("challenger stays on version %s (ds=%s is newer than %s)", current, current_ds, ds)
            return
    registry.set_challenger(version, settings)


def _finish(version: str, ds: str, settings: Settings) -> None:
    _maybe_set_challenger(version, ds, settings)
    registry.tag_version(version, {registry.TAG_STATUS: STATUS_REGISTERED}, settings)


def _log_artifacts(rec: RunRecord, settings: Settings) -> list[str]:
    """Log files, plots, the comparison table and the model card to the active run; return
    the plot notes."""
    margin = settings.promotion_noninferiority_margin
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        made = report.make_plots(rec.run_dir, rec.train, rec.evaluation, out / "plots", noninferiority_margin=margin,
                                 gate_estimator=settings.promotion_estimator)
        lineage = {**rec.lineage, "source_run": mlflow.active_run().info.run_id}
        card = report.model_card(ds=rec.ds, manifest=rec.manifest, train=rec.train, evaluation=rec.evaluation,
                                 lineage=lineage, notes=made.notes, noninferiority_margin=margin,
                                 gate_estimator=settings.promotion_estimator)
        (out / "model_card.md").write_text(card)
        mlflow.log_artifact(str(out / "model_card.md"))
        if made.plots:
            mlflow.log_artifacts(str(out / "plots"), artifact_path="plots")
        mlflow.set_tag("mlflow.note.content", card[:MAX_TAG_CHARS])
    rows = report.comparison_rows(rec.evaluation, margin, settings.promotion_estimator)
    if rows:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file=COMPARISON_FILE)
    for name in ("train.json", "evaluation.json"):
        mlflow.log_artifact(str(rec.run_dir / name))
    mlflow.log_artifact(str(rec.run_dir / "bundle" / bundle.MANIFEST), artifact_path="bundle")
    mlflow.log_artifact(str(rec.run_dir / "bundle" / bundle.SPEC_FILE))
    return made.notes


def _partition_dataset(path: Path, name: str):
    """An MLflow dataset for a Parquet partition folder: its location (the source), a
    digest of its files (names and sizes) and its row count (from the Parquet footers;
    nothing is loaded). None when the folder holds no Parquet."""
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    files = sorted(Path(path).glob("*.parquet"))
    if not files:
        return None, 0
    digest = hashlib.sha256(json.dumps([(f.name, f.stat().st_size) for f in files]).encode()).hexdigest()[:16]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    uri = "file://" + quote(str(Path(path).resolve()), safe="/=:")  # keeps ds=D readable
    with warnings.catch_warnings():
        # MLflow asks every source kind (the Unity Catalog one warns off Databricks) and has
        # the local one registered twice ('' and 'file'), which it warns about too
        warnings.filterwarnings("ignore", message="Failed to determine whether UCVolumeDatasetSource")
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(uri)
    return MetaDataset(source=source, name=name, digest=digest), rows


def log_datasets(rec: RunRecord, lake: Lake) -> list[str]:
    """Log the training days and the held-out day of the run as MLflow datasets (input
    contexts ``training`` and ``heldout``), each its ``training/ds=D`` Parquet partition;
    return the names logged. On a cold start the held-out day's early part trained the model
    and its late part was valued: the partition is logged twice, ``training ds=D (early
    part)`` and ``training ds=D (late part)``, with ``keyart.part`` saying which."""
    window = data_window(rec.train, rec.evaluation)
    heldout = window["heldout_ds"]
    late = rec.evaluation.get("heldout_part") == "late"
    wanted = [(d, "training", "early" if d == heldout else "all") for d in window["training_days"]]
    if heldout:
        wanted.append((heldout, "heldout", "late" if late else "all"))
    datasets, contexts, tags = [], [], []
    for day, context, part in wanted:
        name = f"training ds={day}" + (f" ({part} part)" if part != "all" else "")
        dataset, rows = _partition_dataset(lake.training(day), name)
        if dataset is None:
            log.warning("ds=%s: no Parquet in %s; dataset not logged", rec.ds, lake.training(day))
            continue
        datasets.append(dataset)
        contexts.append(context)
        tags.append({"keyart.ds": day, "keyart.rows": str(rows), "keyart.part": part})
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)
    return [d.name for d in datasets]


def describe_version(version: str, text: str, settings: Settings) -> None:
    """Set the version's description (the first thing the version page shows)."""
    registry.client(settings).update_model_version(settings.registered_model, str(version), description=text)


def set_status(version: str, status: str, settings: Settings) -> None:
    registry.tag_version(str(version), {registry.TAG_STATUS: status}, settings)


def champion_changed(new: str | None, previous: str | None, settings: Settings,
                     previous_status: str = STATUS_FORMER) -> None:
    """Keep ``keyart.status`` in step with ``@champion``: the new champion's status is
    ``champion``, the one it replaced gets ``previous_status``."""
    if new is not None:
        set_status(new, STATUS_CHAMPION, settings)
    if previous is not None and previous != new:
        set_status(previous, previous_status, settings)


def decision_text(ds: str, decision: Mapping[str, Any]) -> str:
    """The version description after the gate: decision, reason, what serves now."""
    verdict = {"promoted": "promoted, now the champion", "kept": "not promoted: the champion was kept",
               "already_champion": "already the champion"}.get(str(decision.get("decision")), str(decision.get("decision")))
    lines = [f"**Gate decision for ds={ds}: {verdict}.**", "", f"Reason: {decision.get('reason', '')}", ""]
    if decision.get("champion_after"):
        refresh = str(decision.get("publish_note") or "").startswith("table refresh")
        lines.append(f"Champion after the gate: version {decision['champion_after']}"
                     + (f" ({decision['publish_note']})" if refresh else "") + ".")
    lines.append("The source run's description is the model card (challenger vs champion, plots).")
    return "\n".join(lines)


def record_decision(version: str, decision: Mapping[str, Any], settings: Settings) -> None:
    """After the gate: the version's description and status, and on its run the model card
    (decision section), ``plots/challenger_vs_champion.png`` and the run description.

    ``decision`` holds ``decision``, ``reason``, ``at``, ``champion_before``,
    ``champion_after``, ``published``, ``publish_note``, ``estimator`` (the one the gate read)
    and ``figures`` (the gate's).
    The card is rebuilt from the run's own artifacts, so this works wherever the run is."""
    mv = registry.get_version(version, settings)
    ds = mv.tags.get(registry.TAG_DS, "?")
    describe_version(version, decision_text(ds, decision), settings)
    status = {"promoted": STATUS_CHAMPION, "already_champion": STATUS_CHAMPION}.get(
        str(decision.get("decision")), STATUS_NOT_PROMOTED)
    if status == STATUS_NOT_PROMOTED and registry.get_champion_version(settings) == str(version):
        status = STATUS_CHAMPION
    set_status(version, status, settings)
    if not mv.run_id:
        return
    c = registry.client(settings)
    margin = settings.promotion_noninferiority_margin
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        try:
            files = {name: json.loads(Path(c.download_artifacts(mv.run_id, name, str(out))).read_text())
                     for name in ("train.json", "evaluation.json", f"bundle/{bundle.MANIFEST}")}
        except Exception as exc:  # a run logged without them: the description still says it all
            log.warning("version %s: cannot rebuild the model card from run %s: %s", version, mv.run_id, exc)
            return
        evaluation = files["evaluation.json"]
        plots = out / "plots"
        plots.mkdir()
        gate_estimator = decision.get("estimator") or settings.promotion_estimator
        drawn = report.difference_plot(evaluation, plots / "challenger_vs_champion.png", margin,
                                       {**decision, "version": version}, gate_estimator)
        notes = [n for n in (mv.tags.get("keyart.report_notes") or "").split("; ") if n]
        lineage = {k: mv.tags[f"keyart.{k}"] for k in LINEAGE_KEYS if f"keyart.{k}" in mv.tags}
        card = report.model_card(ds=ds, manifest=files[f"bundle/{bundle.MANIFEST}"], train=files["train.json"],
                                 evaluation=evaluation, lineage=lineage, notes=notes,
                                 decision={**decision, "version": version}, noninferiority_margin=margin,
                                 gate_estimator=gate_estimator)
        (out / "model_card.md").write_text(card)
        c.log_artifact(mv.run_id, str(out / "model_card.md"))
        if isinstance(drawn, Path):
            c.log_artifact(mv.run_id, str(drawn), "plots")
        c.set_tag(mv.run_id, "mlflow.note.content", card[:MAX_TAG_CHARS])


def register_run(ds: str, settings: Settings | None = None, run_dir: Path | None = None,
                 replace: bool = False) -> RegisterResult:
    """Log the run of ``ds`` and register its bundle; return the version.

    One version per day: a rerun of a day (Airflow retry, backfill) keeps the version already
    registered for it, even when retraining gave slightly different bytes (Spark's float
    aggregation order is not fixed). ``replace`` registers the new bundle as a new version.
    """
    t0 = time.perf_counter()
    settings = registry.configure(settings)
    ds = fmt_ds(ds)
    run_dir = Path(run_dir) if run_dir else Lake(settings.lake).run_dir(ds)
    rec = read_run_dir(run_dir, ds, settings)
    existing = registry.find_version(ds, rec.checksum, settings)
    if existing is not None:
        if not is_registered(existing.tags):
            _finish(str(existing.version), ds, settings)  # an earlier attempt died late
        log.info("ds=%s bundle %s is already version %s; nothing to do",
                 ds, rec.checksum[:12], str(existing.version))
        return RegisterResult(str(existing.version), existing.run_id or "", created=False)
    same_day = [v for v in registry.versions_for_ds(ds, settings) if is_registered(v.tags)]
    if same_day and not replace:
        kept = max(same_day, key=lambda v: int(v.version))
        log.warning("ds=%s already has version %s (bundle %s); keeping it, not registering bundle %s "
                    "(use --replace to register it)", ds, kept.version,
                    kept.tags.get(registry.TAG_SHA, "?")[:12], rec.checksum[:12])
        return RegisterResult(str(kept.version), kept.run_id or "", created=False)

    experiment_id = registry.ensure_experiment(settings)
    run_tags = {"keyart.ds": ds, registry.TAG_SHA: rec.checksum,
                "keyart.bundle_version": rec.lineage["bundle_version"], **airflow_tags()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ds={ds}", tags=run_tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(rec.params)
        # The model is logged before the run's metrics: MLflow 3.7's Model.log re-logs every
        # metric already on the run (to link it to the model) with its original timestamp,
        # which the SQL stores reject as a duplicate key.
        model_uri = registry.log_bundle_model(run_dir / "bundle", run_id,
                                              model_tags={"keyart.ds": ds})
        mlflow.log_metrics(rec.metrics)
        log_datasets(rec, Lake(settings.lake))
        notes = _log_artifacts(rec, settings)
        if notes:
            mlflow.set_tag("keyart.report_notes", "; ".join(notes)[:MAX_TAG_CHARS])
        tags = {f"keyart.{k}": v for k, v in rec.lineage.items()}
        tags.update({registry.TAG_SHA: rec.checksum, "keyart.source_run": run_id, **airflow_tags()})
        version = str(registry.register_version(model_uri, tags, settings).version)
        mlflow.set_tag("keyart.model_version", version)
        mlflow.log_metric("timing.register_s", time.perf_counter() - t0)
    describe_version(version, f"Challenger trained for ds={ds} (held-out day {rec.lineage['heldout_ds']}): "
                              "awaiting `keyart gate`, which writes its decision and reason here.", settings)
    _finish(version, ds, settings)
    log.info("ds=%s registered as %s version %s (run %s)", ds, settings.registered_model, version, run_id)
    return RegisterResult(version, run_id, created=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, help="partition date YYYY-MM-DD of the run to register")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory (default <lake>/runs/ds=D)")
    parser.add_argument("--replace", action="store_true",
                        help="register this bundle even if the day already has a version")


def run(args: argparse.Namespace) -> int:
    s = default_settings()
    run_dir = Path(args.run_dir) if args.run_dir else Lake(s.lake).run_dir(args.ds)
    refusal = bundle.read_export_refusal(run_dir)
    if refusal is not None:
        # the day's model failed its export: there is nothing servable to register
        log.warning("register: the export of ds=%s refused its model (%s); nothing is registered",
                    fmt_ds(args.ds), refusal.get("reason"))
        print(json.dumps({"ds": fmt_ds(args.ds), "version": None, "refused": refusal.get("reason")}))
        return 0
    try:
        result = register_run(args.ds, s, args.run_dir, replace=args.replace)
    except (FileNotFoundError, ValueError, bundle.BundleError) as exc:
        log.error("register: %s", exc)
        return 1
    print(json.dumps({"ds": fmt_ds(args.ds), "version": result.version, "run_id": result.run_id,
                      "created": result.created}))
    return 0


def register_refresh(ds: str, bundle_dir: Path, model_from: str, replaced: str, reason: str,
                     settings: Settings | None = None) -> RegisterResult:
    """Register the table refresh in ``bundle_dir`` (tables of ``ds``, the model of trained
    version ``model_from``; ``replaced`` is the champion it refreshes) and return its version.

    One version per (ds, model): a refresh of the same model for the same day that is already
    registered is returned as it is, so a rerun of the gate adds nothing. The version is
    logged under its own run (``ds=D table refresh``) so the registry keeps the manifest and
    why the refresh was made; the ``challenger`` alias stays on the newest trained version.
    """
    t0 = time.perf_counter()
    settings = registry.configure(settings)
    ds = fmt_ds(ds)
    manifest = bundle.verify(bundle_dir)
    model_sha = str(manifest["files"][bundle.MODEL_FILE])
    origin = registry.get_version(model_from, settings)
    for v in registry.versions_for_ds(ds, settings, kind=registry.KIND_REFRESH):
        if v.tags.get(registry.TAG_MODEL_SHA) == model_sha:
            if not is_registered(v.tags):  # an earlier attempt died late
                registry.tag_version(str(v.version), {registry.TAG_STATUS: STATUS_REGISTERED}, settings)
            log.info("ds=%s: the tables of the day are already version %s for model v%s", ds, v.version, model_from)
            return RegisterResult(str(v.version), v.run_id or "", created=False)
    checksum = registry.bundle_checksum(bundle_dir)
    lineage = {
        registry.TAG_DS: ds, registry.TAG_KIND: registry.KIND_REFRESH, registry.TAG_TABLES_DS: ds,
        registry.TAG_MODEL_FROM: str(origin.version), registry.TAG_MODEL_SHA: model_sha,
        registry.TAG_MODEL_DS: registry.model_ds(origin.tags) or "",
        "keyart.model_bundle_version": origin.tags.get(registry.TAG_BUNDLE_VERSION, ""),
        "keyart.refreshed_champion": str(replaced), "keyart.refresh_reason": reason[:MAX_TAG_CHARS],
        registry.TAG_BUNDLE_VERSION: manifest.version, registry.TAG_SHA: checksum,
        "keyart.feature_spec_version": manifest.feature_spec_version,
        "keyart.heldout_ds": origin.tags.get("keyart.heldout_ds", str(manifest.get("heldout_ds"))),
        "keyart.data_partitions": origin.tags.get("keyart.data_partitions", ""),
        "keyart.parity_passed": "true" if (manifest.get("parity") or {}).get("passed") else "false",
    }
    experiment_id = registry.ensure_experiment(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ds={ds} table refresh",
                          tags={**{k: v for k, v in lineage.items() if k != "keyart.refresh_reason"},
                                **airflow_tags()}) as run:
        run_id = run.info.run_id
        mlflow.log_params({"ds": ds, "model_from": str(origin.version), "bundle_version": manifest.version,
                           "tables_ds": ds, **{f"rows.{k}": v for k, v in (manifest.get("row_counts") or {}).items()}})
        model_uri = registry.log_bundle_model(Path(bundle_dir), run_id, model_tags={"keyart.ds": ds})
        mlflow.log_metrics(flatten_numeric("parity", manifest.get("parity")))
        mlflow.log_artifact(str(Path(bundle_dir) / bundle.MANIFEST), artifact_path="bundle")
        mlflow.set_tag("mlflow.note.content",
                       f"Table refresh for ds={ds}: the model of version {origin.version} "
                       f"(bundle {origin.tags.get(registry.TAG_BUNDLE_VERSION)}, byte for byte) with the "
                       f"priors, member snapshot and catalog of {ds}.\n\nWhy: {reason}"[:MAX_TAG_CHARS])
        version = str(registry.register_version(model_uri, {**lineage, "keyart.source_run": run_id, **airflow_tags()},
                                                settings).version)
        mlflow.set_tag("keyart.model_version", version)
        mlflow.log_metric("timing.register_s", time.perf_counter() - t0)
    describe_version(version, f"**Table refresh for ds={ds}**: the model of version {origin.version} (byte for byte) "
                              f"with the priors, member snapshot and catalog of {ds}.\n\nWhy: {reason}", settings)
    registry.tag_version(version, {registry.TAG_STATUS: STATUS_REGISTERED}, settings)
    log.info("ds=%s: tables registered as version %s (model of version %s)", ds, version, origin.version)
    return RegisterResult(version, run_id, created=True)
