"""
# keyart_daily

The whole batch side of keyart for one partition date `ds` (YYYY-MM-DD, UTC):

```
ingest → check_data_quality → rewards ─┬─ features → training_window ─┬─ train → promote
                                       └─ priors ─────────────────────┘
```

* **ingest, rewards, features, priors** (Spark): with `KEYART_SPARK_REMOTE` (`sc://host:port`,
  `make demo` starts one) a task runs its job as a Spark Connect client of that long-lived
  server, in the task's own process; else as `spark-submit --master <spark_master>` of the job
  file of the installed `keyart.jobs` package (`local[*]` or a cluster: `KEYART_SPARK_MASTER`).
* **check_data_quality** stops the run (no retries) when the day's impressions are missing,
  too much was quarantined, or a complete play log is out of band.
* **training_window** skips `train` and `promote` while no impression is labelled yet.
* **train**: `keyart train`, `evaluate`, `export` (ONNX + parity) in one process.
* **promote**: `keyart register` (MLflow version, `@challenger`), then `keyart gate`: the
  challenger becomes `@champion`, or the champion is kept and republished with the day's
  priors, member snapshot and catalog, so serving gets the day's tables whatever the gate decides.
* **ds** is the `ds` param when given (trigger form), else the run's logical date (the start of
  its daily data interval), else the last complete UTC day before the run was triggered; each
  task resolves it from its run. Every task reads and overwrites only its `ds=` partitions,
  so re-running or backfilling a day is safe.
* XCom holds only output paths, the ingest counts, the training days, and the registered
  version / gate decision.
* The steps, their order, retries and commands are the table `keyart.pipeline.STEPS`; this
  file holds the schedule, the params and the wiring.

Backfill: `airflow backfill create --dag-id keyart_daily --from-date D1 --to-date Dn`
(days run oldest first, one at a time). See docs/airflow.md.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

from keyart import pipeline

DEFAULT_ARGS = {
    "owner": "keyart",
    "retries": 2,
    "retry_delay": dt.timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": dt.timedelta(minutes=30),
    "execution_timeout": dt.timedelta(hours=3),
}


def _step_args(step: pipeline.Step) -> dict:
    args: dict = {"task_id": step.task_id, "doc_md": step.doc}
    if step.retries is not None:
        args["retries"] = step.retries
    if step.depends_on_past:
        args["depends_on_past"] = True
    return args


def _ds() -> str:
    """The partition date of the running task's DAG run (the same for every task of a run)."""
    from airflow.sdk.exceptions import AirflowFailException

    context = get_current_context()
    dag_run = context["dag_run"]
    try:
        day = pipeline.resolve_ds(
            context["params"].get("ds"),
            getattr(dag_run, "logical_date", None),
            getattr(dag_run, "run_after", None),
        )
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from None  # a retry cannot fix the date
    print(f"partition date ds={day}", flush=True)
    return day


@dag(
    dag_id=pipeline.DAG_ID,
    # Data-interval schedule: the run for day D starts after D ends and has logical date D.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    description="keyart: one day's impressions and plays -> Spark features and priors -> reward model, "
    "offline evaluation, ONNX bundle -> MLflow @challenger -> gate -> @champion",
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
    def quality(step):
        @task(**_step_args(step))
        def run() -> dict:
            """Fail the run when the day's logs are missing or too much was quarantined."""
            from airflow.sdk.exceptions import AirflowFailException

            day = _ds()
            try:
                return pipeline.data_quality(day)
            except ValueError as exc:
                # Retrying cannot fix the data; fail now with the reason.
                raise AirflowFailException(str(exc)) from None

        return run()

    def window(step):
        @task.short_circuit(**_step_args(step))
        def run() -> list[str]:
            """The labelled days to train on; none (nothing labelled yet) skips the model steps."""
            day = _ds()
            days = pipeline.training_window(day)
            if not days:
                print(f"nothing to train on for ds={day}: the model steps skip")
            return days

        return run()

    def spark(step):
        @task(**_step_args(step))
        def run() -> str:
            (job,) = step.commands
            return pipeline.run_spark_job(job, _ds())

        return run()

    def model(step):
        @task(**_step_args(step))
        def run() -> dict:
            return pipeline.run_model_steps(step.commands, _ds())

        return run()

    builders = {"spark": spark, "quality": quality, "window": window, "model": model}
    tasks: dict = {}
    for step in pipeline.STEPS:
        tasks[step.task_id] = builders[step.kind](step)
        for upstream in step.upstream:
            tasks[upstream] >> tasks[step.task_id]


keyart_daily()
