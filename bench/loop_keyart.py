"""The keyart arm of ``keyart bench loop``: the product's daily run and its endpoint, in-process.

Each seed is one deployment with its own lake, MLflow registry and settings
(:class:`Deployment` sets ``KEYART_*`` for the seed, so every step reads them as the
DAG's tasks do). For day k >= 1 the daily DAG's steps run for day k - 1, in the order of
:data:`keyart.pipeline.STEPS` (:meth:`KeyartPipeline.daily_run`):

* the Spark jobs ingest -> rewards -> features -> priors on one reused ``local[2]``
  session, with the data-quality gate (:func:`keyart.pipeline.data_quality`) after ingest;
* :func:`keyart.pipeline.training_window`, then the model steps exactly as the DAG calls
  them: ``keyart train | evaluate | export | register | gate --ds D`` through
  :func:`keyart.cli.main` (the gate of :mod:`keyart.models.gate`: non-inferiority against
  the champion, a table refresh when it keeps the champion).

A failing step ends the day's run there, as a failed task ends the DAG run; serving keeps
what it has. Day k is then decided by the endpoint's runtime (:func:`keyart.serving.app.build_runtime`,
no HTTP, no background threads): its bundle store polls ``models:/keyart-artwork@champion``
once after the run, :class:`EndpointChooser` decides every page with ``Service.decide``,
appends the impression lines to the endpoint's own log and counts them in the online
priors, and takes each reward as ``POST /v1/reward`` does (admit, log, count), hour by hour
(:func:`keyart.sim.traffic.simulate_day` with ``send_rewards``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from keyart.lake import Lake, shift_ds
from keyart.sim.choosers import Decisions, build_page_request, parse_decisions

# Settings a deployment of the benchmark must not inherit from the shell that runs it.
_CLEARED = ("KEYART_CONFIG", "KEYART_SERVE_MODEL_URI", "KEYART_SERVE_LOG_DIR", "KEYART_SPARK_REMOTE")


@contextlib.contextmanager
def deployment_env(root: Path, lake_root: Path) -> Iterator[None]:
    """``KEYART_*`` of one deployment: home, lake, registry and serving on the client clock.

    The previous environment and the process-wide settings come back on exit."""
    from keyart.config import settings

    home = root / "home"
    env = {
        "KEYART_HOME": str(home),
        "KEYART_LAKE_ROOT": str(lake_root),
        "KEYART_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "KEYART_MLFLOW_ARTIFACT_ROOT": str(home / "mlflow" / "artifacts"),
        "KEYART_SERVE_CLIENT_CLOCK": "true",  # simulated days: decisions and rewards carry their own time
        "KEYART_SERVE_EVENT_SECRET": secrets.token_hex(32),
        "KEYART_SERVE_LOG_FSYNC": "interval",  # durability does not change a decision; fsync per page is slow
    }
    saved = {k: os.environ.get(k) for k in (*env, *_CLEARED)}
    for k in _CLEARED:
        os.environ.pop(k, None)
    os.environ.update(env)
    settings.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        settings.cache_clear()


class EndpointChooser:
    """Decides with the endpoint's runtime as ``POST /v1/artwork`` does, and takes rewards as
    ``POST /v1/reward`` does: the same calls in the same order, without HTTP."""

    logs_impressions = True
    name = "keyart"

    def __init__(self, rt):
        self.rt = rt
        self.rewards = {"sent": 0, "rejected": 0}

    def choose(self, world, visits, rng: np.random.Generator) -> Decisions:
        from keyart.serving.schemas import ArtworkRequest

        rt = self.rt
        rt.service.rng = rng  # the day's decisions follow the seed
        decisions = Decisions.empty(*visits.titles.shape)
        for i in range(len(visits.titles)):
            req = ArtworkRequest.model_validate(build_page_request(world, visits, i, include_ts=True))
            decided = rt.service.decide(req)
            if decided.ds != visits.ds:
                raise RuntimeError(f"visit {i} of {visits.ds} was stamped {decided.ds}")
            rt.impressions.append_sync(decided.ds, decided.lines)  # not logged = not decided
            rt.rewards.priors.record_impressions(decided.events)
            parse_decisions(world, visits, i, decided.body, decisions)
        return decisions

    def send_rewards(self, events: list[tuple[str, float, str]]) -> dict[str, int]:
        """A reward of 1 for each (event_id, minutes, play time ISO-8601), received at the play time."""
        from keyart.serving.rewards import RewardRefused

        rt = self.rt
        counts = {"sent": 0, "rejected": 0}
        for event_id, minutes, ts in events:
            now = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
            now_ms = int(now.timestamp() * 1000)
            try:
                ref = rt.rewards.admit(event_id, now_ms=now_ms)
            except RewardRefused:
                counts["rejected"] += 1
                continue
            ds, line = rt.rewards.record_line(ref, 1, float(minutes), now)
            rt.reward_log.append_sync(ds, line)
            rt.rewards.apply(ref, 1, now_ms)
            counts["sent"] += 1
        for k, v in counts.items():
            self.rewards[k] += v
        return counts


class KeyartPipeline:
    """The batch side and the endpoint of one deployment (call inside :func:`deployment_env`)."""

    def __init__(self, spark, lake: Lake):
        self.spark = spark
        self.lake = lake
        self.timings: dict[str, float] = {}
        self.rt = None

    def _time(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _job(self, module, ds: str, through: str | None = None) -> None:
        from keyart.jobs.common import run_job

        name = module.__name__.rsplit(".", 1)[-1]
        t0 = time.perf_counter()
        args = argparse.Namespace(ds=ds, through=through, lake=str(self.lake.root), master=None, shuffle_partitions=None)
        run_job(name, module.run, args, spark=self.spark)
        self._time(name, t0)

    def ingest_history(self, first: str, last: str) -> None:
        from keyart.jobs import ingest

        self._job(ingest, first, last)

    def history_affinity(self, ds: str, member_ids: list[str]) -> dict[int, list[tuple[str, float]]]:
        """Member index -> (tag, affinity) of the features job's snapshot as of the end of ``ds``.

        Computed with the job's own ``member_snapshot`` from the ingested plays, not written
        to the lake (the keyart arm's snapshots stay exactly what its DAG writes).
        """
        from keyart.config import settings
        from keyart.contracts import MEMBERS, PLAYS, TITLES
        from keyart.jobs.common import read_range, read_table
        from keyart.jobs.features import EmbeddingParams, SnapshotParams, member_snapshot

        # affinities only: no embedding fit
        params = replace(SnapshotParams.from_settings(ds, settings()), embeddings=EmbeddingParams(rank=0))
        plays = read_range(self.spark, self.lake.clean("plays"), shift_ds(ds, -params.history_days), ds, PLAYS.spark_schema())
        snap, _ = member_snapshot(plays, read_table(self.spark, self.lake.titles, TITLES),
                                  read_table(self.spark, self.lake.members, MEMBERS), params)
        frame = snap.select("member_id", "affinity_tags", "affinity_values").toPandas()
        pos = {m: i for i, m in enumerate(member_ids)}
        return {pos[m]: list(zip(t, v, strict=True)) for m, t, v in
                zip(frame["member_id"], frame["affinity_tags"], frame["affinity_values"], strict=True)
                if m in pos and len(t)}

    def _step(self, step: str, ds: str, ok: tuple[int, ...] = (0,)) -> str:
        """``keyart <step> --ds <ds>`` as the DAG's task runs it; its last printed line."""
        from keyart.cli import main

        t0 = time.perf_counter()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main([step, "--ds", ds])
        self._time(step, t0)
        if rc not in ok:
            raise StepFailed(step, f"keyart {step} --ds {ds} exited with {rc}")
        lines = out.getvalue().strip().splitlines()
        return lines[-1] if lines else ""

    def daily_run(self, ds: str) -> dict[str, Any]:
        """The DAG run for ``ds``; what it decided (``failed`` names the step that stopped it)."""
        from keyart import pipeline
        from keyart.jobs import features as features_job
        from keyart.jobs import ingest, priors, rewards

        run: dict[str, Any] = {"ds": ds}
        try:
            self._job(ingest, ds)
            t0 = time.perf_counter()
            try:
                run["data_quality"] = pipeline.data_quality(ds)
            except ValueError as exc:
                raise StepFailed("check_data_quality", str(exc)) from exc
            finally:
                self._time("check_data_quality", t0)
            for module in (rewards, features_job, priors):
                self._job(module, ds)
            run["training_days"] = pipeline.training_window(ds)
            if not run["training_days"]:
                run["skipped"] = "no labelled impression yet: model steps skipped"
                return run
            for step in ("train", "evaluate"):
                self._step(step, ds)
            from keyart import bundle

            self._step("export", ds, ok=(0, bundle.EXIT_EXPORT_REFUSED))  # a refused model: the DAG goes on (keyart.pipeline)
            refusal = bundle.read_export_refusal(self.lake.run_dir(ds))
            if refusal is not None:
                run["export_refused"] = refusal["reason"]
            run["register"] = pipeline.last_line_value(self._step("register", ds))
            run["gate"] = pipeline.last_line_value(self._step("gate", ds))
        except StepFailed as exc:
            run["failed"] = {"step": exc.step, "error": str(exc)[:1000]}
        run.update(self._run_files(ds))
        return run

    def _run_files(self, ds: str) -> dict[str, Any]:
        """Training and evaluation figures the run wrote (what the report needs)."""
        run_dir = self.lake.run_dir(ds)
        out: dict[str, Any] = {}
        try:
            info = json.loads((run_dir / "train.json").read_text())
        except (OSError, ValueError):
            info = None
        if info is not None:
            valid = info.get("metrics", {}).get("valid", {})
            out["model"] = {"train_days": info["window"]["days"], "heldout_ds": info["heldout_ds"],
                            "cold_start_split": bool(info.get("cold_start_split")), "rows": info.get("rows"),
                            "valid_auc": valid.get("auc"), "best_iteration": info.get("best_iteration")}
        try:
            ev = json.loads((run_dir / "evaluation.json").read_text())
        except (OSError, ValueError):
            ev = None
        if ev is not None:
            policies = ev.get("policies", {})
            out["evaluation"] = {
                "heldout_ds": ev.get("heldout_ds"), "heldout_part": ev.get("heldout_part"),
                "n_impressions": ev.get("n_impressions"),
                "logging": policies.get("logging", {}), "candidate": policies.get("candidate", {}),
                "champion": policies.get("champion", {}),
                "difference": (ev.get("difference") or {}).get("candidate_minus_champion", {}),
                "ess_share": {k: v.get("ess_share") for k, v in (ev.get("weights") or {}).items()},
            }
        return out

    def serve(self) -> dict[str, Any]:
        """The endpoint picks up ``@champion`` (started on first use); what it now serves."""
        from keyart import registry
        from keyart.config import settings
        from keyart.serving.app import build_runtime
        from keyart.serving.metrics import Metrics

        t0 = time.perf_counter()
        if self.rt is None:
            self.rt = build_runtime(settings(), Metrics())  # polls once: the champion, if any
        else:
            self.rt.store.poll_once()
        self._time("endpoint_poll", t0)
        b = self.rt.store.current
        if b is None:
            return {"version": "none", "source": None}
        served: dict[str, Any] = {"version": b.version, "source": b.source, "priors_ds": b.priors_ds}
        source = b.source or ""
        if source.startswith(registry.MODELS_SCHEME) and "@" not in source:
            # models:/<name>/<version>: which model (trained for which day) and which day's tables
            tags = registry.get_version(source.rsplit("/", 1)[-1], settings()).tags
            served.update(registry_version=source.rsplit("/", 1)[-1], kind=registry.version_kind(tags),
                          model_ds=registry.model_ds(tags), tables_ds=registry.tables_ds(tags))
        return served

    def chooser(self) -> EndpointChooser:
        if self.rt is None:
            raise RuntimeError("the endpoint has not started: call serve() first")
        return EndpointChooser(self.rt)

    def close(self) -> None:
        if self.rt is not None:
            self.rt.impressions.close()
            self.rt.reward_log.close()
            self.rt = None


class StepFailed(RuntimeError):
    """A step of the daily run failed; the run stops there."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step
