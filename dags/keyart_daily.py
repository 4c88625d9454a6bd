"""
# keyart_daily

The whole batch side of keyart for one partition date `ds` (YYYY-MM-DD, UTC):

```
partition_date → ingest → check_data_quality → rewards → features → priors → training_window
  → train → evaluate → export (ONNX + parity) → register (MLflow, @challenger) → promote (gate, @champion)
```

* **Spark jobs** (`ingest`, `rewards`, `features`, `priors`) run through `spark-submit
  --master <spark_master>` on the job files of the installed `keyart.jobs` package, so the same
  DAG runs on `local[*]` or a cluster (`KEYART_SPARK_MASTER`); with `KEYART_SPARK_REMOTE`
  (`sc://host:port`) the job files run as Spark Connect clients of that long-lived server.
* **Model steps** are thin calls of the `keyart` command line (`keyart train --ds D`, ...).
* **ds** is the `ds` param when given (trigger form), else the run's logical date (the start of
  its daily data interval), else the last complete UTC day before the run was triggered.
  Every task receives it explicitly; every task reads and overwrites only its `ds=` partitions,
  so re-running or backfilling a day is safe.
* **check_data_quality** stops the run (no retries) when the day's impressions are missing or
  the quarantined share passes `max_quarantine_rate`.
* **training_window** skips the model steps while no impression is labelled yet: the run
  succeeds with them *skipped*. On the first labelled day the model trains on the early
  part of that day and is evaluated on the late part (keyart.models.data).
* XCom holds only the partition date, output paths, the ingest counts, the training days,
  and the registered version / gate decision.

Backfill: `airflow backfill create --dag-id keyart_daily --from-date D1 --to-date Dn`
(days run oldest first, one at a time). See docs/airflow.md.
"""

from __future__ import annotations

import datetime as dt
import shlex

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, chain, dag, get_current_context, task

DAG_ID = "keyart_daily"
SPARK_JOBS = ("ingest", "rewards", "features", "priors")

DEFAULT_ARGS = {
    "owner": "keyart",
    "retries": 2,
    "retry_delay": dt.timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": dt.timedelta(minutes=30),
    "execution_timeout": dt.timedelta(hours=3),
}

# Bash tasks must fail, never skip, whatever their exit code (BashOperator skips on 99).
BASH_ARGS = {"skip_on_exit_code": None}


def resolve_ds(
    param_ds: str | None,
    logical_date: dt.datetime | None,
    run_after: dt.datetime | None,
) -> str:
    """The partition date of a run: the ``ds`` param, else the logical date (the start of the
    daily data interval), else the UTC day before ``run_after`` (a manual run without a
    logical date processes the last complete day)."""
    if param_ds:
        try:
            return dt.datetime.strptime(param_ds, "%Y-%m-%d").strftime("%Y-%m-%d")
        except ValueError:
            raise ValueError(f"param ds must be YYYY-MM-DD, got {param_ds!r}") from None
    if logical_date is not None:
        return pendulum.instance(logical_date).in_timezone("UTC").strftime("%Y-%m-%d")
    if run_after is not None:
        return pendulum.instance(run_after).in_timezone("UTC").subtract(days=1).strftime("%Y-%m-%d")
    raise ValueError("cannot tell the partition date: pass the ds param (YYYY-MM-DD)")


def _venv_bin(name: str) -> str:
    """A console script installed next to this interpreter (the one running the task), else PATH."""
    import shutil
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither next to {sys.executable} nor on PATH")
    return found


def spark_job_command(job: str, ds: str) -> str:
    """The shell command of a Spark task, then the output path.

    ``spark-submit --master <spark_master> <keyart.jobs>/<job>.py --ds <ds>``; with
    ``spark_remote`` set, ``python <keyart.jobs>/<job>.py --ds <ds>`` instead: the job is a
    Spark Connect client of that server (no JVM of its own). Resolved when the task runs
    (worker side): the job file comes from the installed ``keyart.jobs`` package, the master,
    remote and driver memory from keyart's settings."""
    import importlib.util
    import sys
    from pathlib import Path

    from keyart.config import load_settings
    from keyart.lake import Lake

    spec = importlib.util.find_spec("keyart.jobs")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("keyart.jobs is not installed where this task runs")
    job_file = Path(list(spec.submodule_search_locations)[0]) / f"{job}.py"
    if not job_file.exists():
        raise FileNotFoundError(f"Spark job {job_file} does not exist")
    settings = load_settings()
    lake = Lake(settings.lake)
    output = {
        "ingest": lake.metrics("ingest", ds),
        "rewards": lake.rewards(ds),
        "features": lake.training(ds),
        "priors": lake.priors(ds),
    }[job]
    if settings.spark_remote:
        client = [sys.executable, str(job_file), "--ds", ds]
        return f"{shlex.join(client)} && echo {shlex.quote(str(output))}"
    python = shlex.quote(sys.executable)
    # Driver and executors use the task's interpreter unless the cluster says otherwise.
    submit = [
        _venv_bin("spark-submit"),
        "--master", settings.spark_master,
        "--name", f"keyart-{job}-{ds}",
        "--driver-memory", settings.spark_driver_memory,
        str(job_file),
        "--ds", ds,
    ]  # fmt: skip
    return (
        f'export PYSPARK_PYTHON="${{PYSPARK_PYTHON:-{python}}}" '
        f'PYSPARK_DRIVER_PYTHON="${{PYSPARK_DRIVER_PYTHON:-{python}}}" && '
        f"{shlex.join(submit)} && echo {shlex.quote(str(output))}"
    )


# What each model step leaves in XCom: a path of its output, or (register, gate) the one-line
# JSON the command prints (version, run id, decision).
MODEL_STEP_OUTPUT = {"train": "model.txt", "evaluate": "evaluation.json", "export": "bundle",
                     "register": None, "gate": None}


def keyart_command(step: str, ds: str) -> str:
    """``keyart <step> --ds <ds>`` with the task's interpreter.

    The command's stdout is echoed after it ends (its logs go to stderr as they come), so the
    last line, which Airflow pushes to XCom, is the command's last printed line or the output path.
    """
    import sys

    from keyart.config import load_settings
    from keyart.lake import Lake

    argv = [sys.executable, "-m", "keyart.cli", step, "--ds", ds]
    command = f"out=$({shlex.join(argv)}) || exit $?; printf '%s\\n' \"$out\""
    output = MODEL_STEP_OUTPUT[step]
    if output is not None:
        path = Lake(load_settings().lake).run_dir(ds) / output
        command += f"; echo {shlex.quote(str(path))}"
    return command


def last_line_value(line: str):
    """XCom value of a bash task: a JSON object line as a dict, anything else as text."""
    import json

    line = (line or "").strip()
    if line.startswith("{"):
        try:
            return json.loads(line)
        except ValueError:
            pass
    return line


def check_ingest_metrics(metrics: dict, ds: str, max_quarantine_rate: float) -> dict:
    """Small per-log counts from the ingest metrics; raises ValueError with the reason when the
    day must not go on (impressions missing, or too much quarantined)."""
    logs = metrics.get("logs", metrics)
    summary: dict[str, dict[str, float]] = {}
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
    if problems:
        raise ValueError(f"data-quality gate failed for ds={ds}: " + "; ".join(problems))
    return summary


@dag(
    dag_id=DAG_ID,
    # Data-interval schedule: the run for day D starts after D ends and has logical date D.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "ds": Param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            description="Partition date YYYY-MM-DD; empty = the run's logical date.",
        ),
    },
    tags=["keyart", "spark", "lightgbm", "mlflow"],
    doc_md=__doc__,
)
def keyart_daily():
    @task(retries=0)
    def partition_date() -> str:
        context = get_current_context()
        dag_run = context["dag_run"]
        return resolve_ds(
            context["params"].get("ds"),
            getattr(dag_run, "logical_date", None),
            getattr(dag_run, "run_after", None),
        )

    @task(retries=0)
    def check_data_quality(day: str) -> dict:
        """Fail the run when the day's logs are missing or too much was quarantined."""
        import json

        from airflow.sdk.exceptions import AirflowFailException

        from keyart.config import load_settings
        from keyart.lake import Lake

        settings = load_settings()
        path = Lake(settings.lake).metrics("ingest", day)
        if not path.exists():
            raise AirflowFailException(
                f"data-quality gate failed for ds={day}: ingest wrote no metrics at {path}"
            )
        try:
            return check_ingest_metrics(json.loads(path.read_text()), day, settings.max_quarantine_rate)
        except ValueError as exc:
            # Retrying cannot fix the data; fail now with the reason.
            raise AirflowFailException(str(exc)) from None

    @task.short_circuit(retries=0)
    def training_window(day: str) -> list[str]:
        """The labelled days the model would train on; none (nothing labelled yet) skips the model steps."""
        from keyart.config import load_settings
        from keyart.lake import Lake

        settings = load_settings()
        from keyart.models.data import training_days  # pandas/pyarrow: only when the task runs

        try:
            days = training_days(Lake(settings.lake), day, settings.training_window_days)
        except FileNotFoundError as exc:
            days = []
            print(f"no labelled day yet: {exc}")
        if not days:
            print(f"nothing to train on for ds={day}: train, evaluate, export, register, promote skip")
        return days

    def spark_task(job: str, **kwargs):
        @task.bash(task_id=job, **BASH_ARGS, **kwargs)
        def run(day: str) -> str:
            return spark_job_command(job, day)

        return run

    def keyart_task(step: str, task_id: str | None = None, **kwargs):
        @task.bash(task_id=task_id or step, output_processor=last_line_value, **BASH_ARGS, **kwargs)
        def run(day: str) -> str:
            return keyart_command(step, day)

        return run

    # Task arguments are not called "ds": that name is reserved for the context's ds.
    day = partition_date()
    ingest = spark_task("ingest")(day)
    quality = check_data_quality(day)
    rewards = spark_task("rewards")(day)
    features = spark_task("features")(day)
    # Today's priors start from yesterday's: days must run in order.
    priors = spark_task("priors", depends_on_past=True)(day)
    window = training_window(day)
    train = keyart_task("train")(day)
    evaluate = keyart_task("evaluate")(day)
    export = keyart_task("export")(day)
    register = keyart_task("register", depends_on_past=True)(day)
    promote = keyart_task("gate", task_id="promote", depends_on_past=True)(day)
    chain(ingest, quality, rewards, features, priors, window, train, evaluate, export, register, promote)


keyart_daily()
