"""
# keyart_daily

The whole batch side of keyart for one partition date `ds` (YYYY-MM-DD, UTC):

```
partition_date → ingest → check_data_quality → rewards → features → priors → training_window
  → train → evaluate → export (ONNX + parity) → register (MLflow, @challenger) → promote (gate, @champion)
```

* **promote** runs the gate: the challenger becomes `@champion`, or the champion is kept and
  its model is republished with the day's priors, member snapshot and catalog (a table
  refresh), so serving gets the day's tables whatever the gate decides.

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
* The steps, their order, retries and commands are the table `keyart.pipeline.STEPS`; this
  file holds the schedule, the params and the wiring.

Backfill: `airflow backfill create --dag-id keyart_daily --from-date D1 --to-date Dn`
(days run oldest first, one at a time). See docs/airflow.md.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, chain, dag, get_current_context, task

from keyart import pipeline

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


def _step_args(step: pipeline.Step) -> dict:
    args: dict = {"task_id": step.task_id}
    if step.retries is not None:
        args["retries"] = step.retries
    if step.depends_on_past:
        args["depends_on_past"] = True
    return args


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
    def partition_date(step):
        @task(**_step_args(step))
        def run() -> str:
            context = get_current_context()
            dag_run = context["dag_run"]
            return pipeline.resolve_ds(
                context["params"].get("ds"),
                getattr(dag_run, "logical_date", None),
                getattr(dag_run, "run_after", None),
            )

        return run()

    def quality(step, day):
        @task(**_step_args(step))
        def run(day: str) -> dict:
            """Fail the run when the day's logs are missing or too much was quarantined."""
            from airflow.sdk.exceptions import AirflowFailException

            try:
                return pipeline.data_quality(day)
            except ValueError as exc:
                # Retrying cannot fix the data; fail now with the reason.
                raise AirflowFailException(str(exc)) from None

        return run(day)

    def window(step, day):
        @task.short_circuit(**_step_args(step))
        def run(day: str) -> list[str]:
            """The labelled days to train on; none (nothing labelled yet) skips the model steps."""
            days = pipeline.training_window(day)
            if not days:
                print(f"nothing to train on for ds={day}: the model steps skip")
            return days

        return run(day)

    def spark(step, day):
        @task.bash(**_step_args(step), **BASH_ARGS)
        def run(day: str) -> str:
            return pipeline.spark_job_command(step.command, day)

        return run(day)

    def model(step, day):
        @task.bash(**_step_args(step), output_processor=pipeline.last_line_value, **BASH_ARGS)
        def run(day: str) -> str:
            return pipeline.keyart_command(step.command, day)

        return run(day)

    # Task arguments are not called "ds": that name is reserved for the context's ds.
    first, *rest = pipeline.STEPS
    day = partition_date(first)
    builders = {"spark": spark, "quality": quality, "window": window, "model": model}
    chain(*[builders[step.kind](step, day) for step in rest])


keyart_daily()
