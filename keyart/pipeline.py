"""The daily pipeline as data: its DAG id, its steps in order, and what each task runs.

``dags/keyart_daily.py`` builds its tasks from :data:`STEPS` and calls the helpers below
when a task runs, so the DAG file holds only the schedule, the params and the wiring, and
everything here is tested without Airflow. The job list (:data:`SPARK_JOBS`) is also what
``keyart job`` accepts.

Nothing here imports Spark, pandas or MLflow: the DAG file imports this module when the
scheduler parses it, and parsing must stay cheap.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DAG_ID = "keyart_daily"
SPARK_JOBS = ("ingest", "rewards", "features", "priors")
MODEL_STEPS = ("train", "evaluate", "export", "register", "gate")

StepKind = Literal["spark", "quality", "window", "model"]


@dataclass(frozen=True)
class Step:
    """One task of the daily DAG.

    ``commands`` are the Spark job (spark tasks) or the ``keyart`` commands (model tasks) the
    task runs, in order, in one process; ``upstream`` the tasks it waits for; ``retries``
    None means the DAG's default (steps whose failure a retry cannot fix have 0);
    ``depends_on_past`` marks steps that chain through yesterday's state (priors start from
    yesterday's, the registry and the champion carry over), so days must run in order.
    ``doc`` is what the task's details in the UI say.
    """

    task_id: str
    kind: StepKind
    commands: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    retries: int | None = None
    depends_on_past: bool = False
    doc: str = ""


# features and priors both read the day's rewards and not each other, so they are two
# branches; train needs both (the bundle carries the day's priors). Steps that a separate
# task would only make slower share one: train + evaluate + export produce one bundle (a
# retry redoes them together anyway), register + gate publish it.
STEPS: tuple[Step, ...] = (
    Step("ingest", "spark", ("ingest",),
         doc="Spark: validate the day's raw impression and play logs into clean/ and quarantine/."),
    Step("check_data_quality", "quality", upstream=("ingest",), retries=0,
         doc="Fail the run (no retries) when impressions are missing, too much was quarantined, "
             "or a complete play log is out of band."),
    Step("rewards", "spark", ("rewards",), upstream=("check_data_quality",),
         doc="Spark: attribute plays to impressions inside the attribution window (closed windows only)."),
    Step("features", "spark", ("features",), upstream=("rewards",),
         doc="Spark: the member snapshot and the training rows of the day."),
    Step("priors", "spark", ("priors",), upstream=("rewards",), depends_on_past=True,
         doc="Spark: warm-start the Beta priors from yesterday's with the day's rewards."),
    Step("training_window", "window", upstream=("features",), retries=0,
         doc="The labelled days to train on; none yet skips train and promote."),
    Step("train", "model", ("train", "evaluate", "export"), upstream=("training_window", "priors"),
         doc="keyart train, evaluate (replay/IPS/SNIPS/DR), export (ONNX bundle with a parity check)."),
    Step("promote", "model", ("register", "gate"), upstream=("train",), depends_on_past=True,
         doc="keyart register (MLflow version, @challenger), then keyart gate (@champion: "
             "promoted, or the champion kept and republished with the day's tables)."),
)

# What each model command leaves in XCom: a path of its output under runs/ds=D, or (register,
# gate) the one-line JSON the command prints (version, run id; decision, and the champion
# version that serves the day's tables).
MODEL_STEP_OUTPUT: dict[str, str | None] = {
    "train": "model.txt", "evaluate": "evaluation.json", "export": "bundle", "register": None, "gate": None,
}

# What the tasks import when they run: a long-lived process that forks the task processes
# (the LocalExecutor under the scheduler) may import them once beforehand
# (keyart.demo.airflow_env), so no task pays for them.
TASK_MODULES: tuple[str, ...] = (
    "keyart.jobs.common", *(f"keyart.jobs.{job}" for job in SPARK_JOBS),
    "keyart.models.train", "keyart.models.evaluate", "keyart.models.export", "keyart.models.register",
    "keyart.models.gate",
)


def resolve_ds(
    param_ds: str | None,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None,
) -> str:
    """The partition date of a run: the ``ds`` param, else the logical date (the start of the
    daily data interval), else the UTC day before ``run_after``: the last complete day.

    A logical date whose day has not ended when the run starts (the UI's trigger form fills
    in "now") also means the last complete day: processing a day still being logged would
    label it with plays that have not arrived."""
    if param_ds:
        try:
            return dt.datetime.strptime(param_ds, "%Y-%m-%d").strftime("%Y-%m-%d")
        except ValueError:
            raise ValueError(f"param ds must be YYYY-MM-DD, got {param_ds!r}") from None
    if logical_date is not None:
        day = _utc(logical_date).replace(hour=0, minute=0, second=0, microsecond=0)
        if run_after is None or day + dt.timedelta(days=1) <= _utc(run_after):
            return day.strftime("%Y-%m-%d")
    if run_after is not None:
        return (_utc(run_after) - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    raise ValueError("cannot tell the partition date: pass the ds param (YYYY-MM-DD)")


def _utc(when: dt.datetime) -> dt.datetime:
    # A naive datetime is UTC (Airflow's convention).
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def venv_bin(name: str) -> str:
    """A console script installed next to this interpreter (the one running the task), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither next to {sys.executable} nor on PATH")
    return found


def spark_output(job: str, ds: str, lake) -> Path:
    """The partition a Spark job writes for ``ds`` (its XCom value)."""
    return {
        "ingest": lake.metrics("ingest", ds),
        "rewards": lake.rewards(ds),
        "features": lake.training(ds),
        "priors": lake.priors(ds),
    }[job]


def job_file(job: str) -> Path:
    """The job file of the installed ``keyart.jobs`` package (what spark-submit runs)."""
    import importlib.util

    if job not in SPARK_JOBS:
        raise ValueError(f"unknown Spark job {job!r}; choose from {SPARK_JOBS}")
    spec = importlib.util.find_spec("keyart.jobs")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("keyart.jobs is not installed where this task runs")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{job}.py"
    if not path.exists():
        raise FileNotFoundError(f"Spark job {path} does not exist")
    return path


def spark_submit_argv(job: str, ds: str, settings=None) -> list[str]:
    """``spark-submit --master <spark_master> <keyart.jobs>/<job>.py --ds <ds>``."""
    from keyart.config import Settings

    s = settings or Settings()
    return [
        venv_bin("spark-submit"),
        "--master", s.spark_master,
        "--name", f"keyart-{job}-{ds}",
        "--driver-memory", s.spark_driver_memory,
        str(job_file(job)),
        "--ds", ds,
    ]  # fmt: skip


def run_spark_job(job: str, ds: str) -> str:
    """Run Spark job ``job`` for ``ds`` where the task runs; return its output path (XCom).

    With ``spark_remote`` set the job runs in this process as a Spark Connect client of that
    server (a warm driver: no JVM, no SparkContext of its own); else it is a ``spark-submit``
    application on ``spark_master`` (:func:`spark_submit_argv`), its output in the task log.
    Raises ``RuntimeError`` when the job fails."""
    import os
    import subprocess

    from keyart.config import Settings
    from keyart.lake import Lake

    s = Settings()
    output = spark_output(job, ds, Lake(s.lake))
    started = time.perf_counter()
    if s.spark_remote:
        # `keyart job <job> --ds <ds>` in this process (the task's interpreter, its imports
        # preloaded): a Connect client, so no JVM or SparkContext of its own.
        from keyart.cli import main

        print(f"Spark job {job} for ds={ds} as a Spark Connect client of {s.spark_remote}", flush=True)
        code = main(["job", job, "--ds", ds])
        if code != 0:
            raise RuntimeError(f"keyart job {job} --ds {ds} exited with {code}")
    else:
        argv = spark_submit_argv(job, ds, s)
        print(f"$ {shlex.join(argv)}", flush=True)
        # Driver and executors use the task's interpreter unless the environment says otherwise.
        env = dict(os.environ)
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.run(argv, env=env, check=False).returncode
        if code != 0:
            raise RuntimeError(f"spark-submit of {job} for ds={ds} exited with {code}")
    print(f"Spark job {job} for ds={ds}: {time.perf_counter() - started:.1f} s", flush=True)
    print(output, flush=True)
    return str(output)


class _Tee(io.TextIOBase):
    """Write to the task's stdout (its log) and keep a copy."""

    def __init__(self, out):
        self.out, self.copy = out, io.StringIO()

    def write(self, text: str) -> int:
        self.out.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def run_model_step(step: str, ds: str) -> Any:
    """``keyart <step> --ds <ds>`` in this process; its XCom value.

    The value is the path of the step's output under ``runs/ds=D`` (train, evaluate, export)
    or the JSON line it printed last (register, gate). Raises ``RuntimeError`` when the
    command exits non-zero (its reason is in the log above), except for an export the parity
    check refused: that model is not served, and the value is ``{"refused": reason}``; the
    promote task then keeps the champion and publishes it with the day's tables
    (keyart.bundle.EXPORT_REFUSED_FILE), so one model that cannot be served does not hold
    the day's data back from serving."""
    import contextlib

    from keyart.cli import main
    from keyart.config import Settings
    from keyart.lake import Lake

    if step not in MODEL_STEPS:
        raise ValueError(f"unknown model step {step!r}; choose from {MODEL_STEPS}")
    print(f"$ keyart {step} --ds {ds}", flush=True)
    started = time.perf_counter()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        code = main([step, "--ds", ds])
    if step == "export" and code != 0:
        from keyart import bundle

        refusal = (bundle.read_export_refusal(Lake(Settings().lake).run_dir(ds))
                   if code == bundle.EXIT_EXPORT_REFUSED else None)
        if refusal is not None:
            print(f"WARNING: keyart export --ds {ds} refused the model: {refusal['reason']}; "
                  "the promote task keeps the champion with the day's tables", flush=True)
            return {"refused": refusal["reason"]}
    if code != 0:
        raise RuntimeError(f"keyart {step} --ds {ds} exited with {code}")
    print(f"keyart {step} --ds {ds}: {time.perf_counter() - started:.1f} s", flush=True)
    output = MODEL_STEP_OUTPUT[step]
    if output is not None:
        return str(Lake(Settings().lake).run_dir(ds) / output)
    lines = tee.copy.getvalue().strip().splitlines()
    return last_line_value(lines[-1] if lines else "")


def run_model_steps(steps: tuple[str, ...], ds: str) -> dict[str, Any]:
    """Run model commands in order in this process (one interpreter, one MLflow import);
    step -> XCom value of each."""
    return {step: run_model_step(step, ds) for step in steps}


def last_line_value(line: str) -> Any:
    """XCom value of a bash task: a JSON object line as a dict, anything else as text."""
    line = (line or "").strip()
    if line.startswith("{"):
        try:
            return json.loads(line)
        except ValueError:
            pass
    return line


def check_ingest_metrics(
    metrics: dict,
    ds: str,
    max_quarantine_rate: float,
    history: list[dict] | None = None,
    band_low: float = 0.5,
    band_high: float = 2.0,
    band_min_days: int = 3,
) -> dict:
    """Small per-log counts from the ingest metrics; raises ValueError with the reason when the
    day must not go on (impressions missing, too much quarantined, or plays out of band).

    The band: plays per clean impression and quality plays per clean impression (the take
    rate as ingest sees it) must lie within [band_low, band_high] times their median over
    ``history`` (the ingest metrics of the preceding days). Only days with clean impressions
    and a complete play log count, and there is no band with fewer than ``band_min_days``
    of them. A day whose play log is not complete (no completeness marker) is not checked
    against the band: rewards waits for its plays instead of labelling with them."""
    logs = metrics.get("logs", metrics)
    summary: dict[str, Any] = {}
    problems: list[str] = []
    for log in ("impressions", "plays"):
        counts = logs.get(log) or {}
        read = int(counts.get("read", 0))
        quarantined = int(counts.get("quarantined", 0))
        rate = quarantined / read if read else 0.0
        summary[log] = {
            "read": read,
            "clean": int(counts.get("clean", 0)),
            "quarantined": quarantined,
            "duplicates": int(counts.get("duplicates", 0)),
            "quarantine_rate": round(rate, 6),
        }
        if rate > max_quarantine_rate:
            reasons = counts.get("reasons") or {}
            top = ", ".join(f"{reason}: {n}" for reason, n in list(reasons.items())[:3])
            problems.append(
                f"{log}: {quarantined} of {read} rows quarantined ({rate:.2%}) "
                f"> max_quarantine_rate {max_quarantine_rate:.2%}" + (f" (top reasons: {top})" if top else "")
            )
    if summary["impressions"]["read"] == 0:
        problems.insert(0, f"no impressions were read for ds={ds}: the day's raw impression log is missing or empty")
    complete = _plays_complete(logs)
    summary["plays"]["complete"] = complete
    if not complete:
        why = ((logs.get("plays") or {}).get("completeness") or {}).get("reason")
        summary["plays"]["incomplete_reason"] = why
    elif summary["impressions"]["clean"] > 0:
        today = _band_figures(logs)
        past = [f for f in (_band_figures(m.get("logs", m)) for m in (history or []) if _plays_complete(m.get("logs", m))) if f]
        band: dict[str, Any] = {}
        for name, label in (("plays_per_impression", "plays per impression"), ("quality_play_rate", "quality plays per impression")):
            values = sorted(f[name] for f in past if f.get(name) is not None)
            value = today.get(name)
            if value is None or len(values) < band_min_days:
                band[name] = {"value": value, "median": None, "days": len(values)}
                continue
            median = _median(values)
            low, high = band_low * median, band_high * median
            band[name] = {"value": round(value, 6), "median": round(median, 6), "days": len(values),
                          "low": round(low, 6), "high": round(high, 6)}
            if not low <= value <= high:
                problems.append(
                    f"plays: {label} {value:.4f} is outside the band [{low:.4f}, {high:.4f}] ({band_low:g}x to "
                    f"{band_high:g}x the median {median:.4f} of the {len(values)} days before): the play log looks "
                    + ("incomplete or broken" if value < low else "duplicated or inflated")
                    + " although marked complete")
        summary["band"] = band
    if problems:
        raise ValueError(f"data-quality gate failed for ds={ds}: " + "; ".join(problems))
    return summary


def _plays_complete(logs: dict) -> bool:
    # metrics written before play-log completeness markers carry no "completeness": complete
    completeness = (logs.get("plays") or {}).get("completeness")
    return True if completeness is None else bool(completeness.get("complete"))


def _band_figures(logs: dict) -> dict[str, float]:
    impressions = int((logs.get("impressions") or {}).get("clean", 0))
    plays = logs.get("plays") or {}
    if impressions <= 0:
        return {}
    out = {"plays_per_impression": int(plays.get("clean", 0)) / impressions}
    if plays.get("quality") is not None:
        out["quality_play_rate"] = int(plays["quality"]) / impressions
    return out


def _median(values: list[float]) -> float:
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def data_quality(ds: str) -> dict:
    """The data-quality gate of day ``ds`` on the ingest metrics the lake holds (the band is
    set by the ingest metrics of the ``dq_band_days`` days before)."""
    from keyart.config import Settings
    from keyart.lake import Lake, shift_ds

    s = Settings()
    lake = Lake(s.lake)
    path = lake.metrics("ingest", ds)
    if not path.exists():
        raise ValueError(f"data-quality gate failed for ds={ds}: ingest wrote no metrics at {path}")
    history = []
    for back in range(1, s.dq_band_days + 1):
        earlier = lake.metrics("ingest", shift_ds(ds, -back))
        try:
            history.append(json.loads(earlier.read_text()))
        except (OSError, ValueError):
            continue
    return check_ingest_metrics(json.loads(path.read_text()), ds, s.max_quarantine_rate, history=history,
                                band_low=s.dq_band_low, band_high=s.dq_band_high, band_min_days=s.dq_band_min_days)


def training_window(ds: str) -> list[str]:
    """The labelled days the model of ``ds`` would train on; empty when nothing is labelled yet."""
    from keyart.config import Settings
    from keyart.lake import Lake, training_days

    s = Settings()
    try:
        return training_days(Lake(s.lake), ds, s.training_window_days)
    except FileNotFoundError:
        return []
