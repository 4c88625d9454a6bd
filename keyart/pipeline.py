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
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DAG_ID = "keyart_daily"
SPARK_JOBS = ("ingest", "rewards", "features", "priors")
MODEL_STEPS = ("train", "evaluate", "export", "register", "gate")

StepKind = Literal["partition", "spark", "quality", "window", "model"]


@dataclass(frozen=True)
class Step:
    """One task of the daily DAG.

    ``command`` is the ``keyart`` command (model steps) or the Spark job name; ``retries``
    None means the DAG's default (steps whose failure a retry cannot fix have 0);
    ``depends_on_past`` marks steps that chain through yesterday's state (priors start from
    yesterday's, the registry and the champion carry over), so days must run in order.
    """

    task_id: str
    kind: StepKind
    command: str | None = None
    retries: int | None = None
    depends_on_past: bool = False


STEPS: tuple[Step, ...] = (
    Step("partition_date", "partition", retries=0),
    Step("ingest", "spark", "ingest"),
    Step("check_data_quality", "quality", retries=0),
    Step("rewards", "spark", "rewards"),
    Step("features", "spark", "features"),
    Step("priors", "spark", "priors", depends_on_past=True),
    Step("training_window", "window", retries=0),
    Step("train", "model", "train"),
    Step("evaluate", "model", "evaluate"),
    Step("export", "model", "export"),
    Step("register", "model", "register", depends_on_past=True),
    Step("promote", "model", "gate", depends_on_past=True),
)

# What each model step leaves in XCom: a path of its output under runs/ds=D, or (register,
# gate) the one-line JSON the command prints (version, run id; decision, and the champion
# version that serves the day's tables).
MODEL_STEP_OUTPUT: dict[str, str | None] = {
    "train": "model.txt", "evaluate": "evaluation.json", "export": "bundle", "register": None, "gate": None,
}


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


def spark_job_command(job: str, ds: str) -> str:
    """The shell command of a Spark task, then the output path.

    ``spark-submit --master <spark_master> <keyart.jobs>/<job>.py --ds <ds>``; with
    ``spark_remote`` set, ``python <keyart.jobs>/<job>.py --ds <ds>`` instead: the job is a
    Spark Connect client of that server (no JVM of its own). Resolved when the task runs
    (worker side): the job file comes from the installed ``keyart.jobs`` package, the master,
    remote and driver memory from keyart's settings."""
    import importlib.util

    from keyart.config import Settings
    from keyart.lake import Lake

    if job not in SPARK_JOBS:
        raise ValueError(f"unknown Spark job {job!r}; choose from {SPARK_JOBS}")
    spec = importlib.util.find_spec("keyart.jobs")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("keyart.jobs is not installed where this task runs")
    job_file = Path(list(spec.submodule_search_locations)[0]) / f"{job}.py"
    if not job_file.exists():
        raise FileNotFoundError(f"Spark job {job_file} does not exist")
    s = Settings()
    output = spark_output(job, ds, Lake(s.lake))
    if s.spark_remote:
        client = [sys.executable, str(job_file), "--ds", ds]
        return f"{shlex.join(client)} && echo {shlex.quote(str(output))}"
    python = shlex.quote(sys.executable)
    # Driver and executors use the task's interpreter unless the cluster says otherwise.
    submit = [
        venv_bin("spark-submit"),
        "--master", s.spark_master,
        "--name", f"keyart-{job}-{ds}",
        "--driver-memory", s.spark_driver_memory,
        str(job_file),
        "--ds", ds,
    ]  # fmt: skip
    return (
        f'export PYSPARK_PYTHON="${{PYSPARK_PYTHON:-{python}}}" '
        f'PYSPARK_DRIVER_PYTHON="${{PYSPARK_DRIVER_PYTHON:-{python}}}" && '
        f"{shlex.join(submit)} && echo {shlex.quote(str(output))}"
    )


def keyart_command(step: str, ds: str) -> str:
    """``keyart <step> --ds <ds>`` with the task's interpreter.

    The command's stdout is echoed after it ends (its logs go to stderr as they come), so the
    last line, which Airflow pushes to XCom, is the command's last printed line or the output path.
    """
    from keyart.config import Settings
    from keyart.lake import Lake

    if step not in MODEL_STEPS:
        raise ValueError(f"unknown model step {step!r}; choose from {MODEL_STEPS}")
    argv = [sys.executable, "-m", "keyart.cli", step, "--ds", ds]
    command = f"out=$({shlex.join(argv)}) || exit $?; printf '%s\\n' \"$out\""
    output = MODEL_STEP_OUTPUT[step]
    if output is not None:
        path = Lake(Settings().lake).run_dir(ds) / output
        command += f"; echo {shlex.quote(str(path))}"
    return command


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
