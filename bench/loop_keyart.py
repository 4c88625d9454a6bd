"""The keyart arm of ``keyart bench loop``: the real batch steps and the real decision path, in-process.

For day k >= 1 the steps of the daily DAG run for day k - 1 (Spark jobs ingest -> rewards ->
features -> priors on one reused ``local[2]`` session, then ``train_run`` and
``export_bundle`` from :mod:`keyart.models`). The bundle is loaded with serving's
:func:`~keyart.serving.bundle_store.load_bundle` and day k's visits are decided by
:class:`~keyart.serving.service.Service` (``decide``: the code the endpoint runs, minus
HTTP). :class:`ServiceChooser` writes the impression lines ``decide`` returns to
``raw/impressions/ds=D/`` so the next day's jobs read them, as they read the endpoint's log.

Not run: offline evaluation, MLflow registration and the champion gate (the newest bundle
always serves) and online reward updates of the priors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from keyart.lake import Lake, shift_ds
from keyart.sim.choosers import Decisions, build_page_request, parse_decisions


class ServiceChooser:
    """Decides every visit with ``Service.decide`` and logs the impressions it returns."""

    logs_impressions = True

    def __init__(self, service, lake: Lake, name: str = "keyart"):
        self.service = service
        self.lake = lake
        self.name = name

    def choose(self, world, visits, rng: np.random.Generator) -> Decisions:
        from keyart.serving.schemas import ArtworkRequest

        self.service.rng = rng
        decisions = Decisions.empty(*visits.titles.shape)
        out = self.lake.raw("impressions", visits.ds)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"serving-{self.name}.jsonl", "wb") as log:
            for i in range(len(visits.titles)):
                req = ArtworkRequest.model_validate(build_page_request(world, visits, i, include_ts=True))
                body, ds, lines, *_ = self.service.decide(req)
                if ds != visits.ds:
                    raise RuntimeError(f"visit {i} of {visits.ds} was stamped {ds}")
                log.write(lines)
                parse_decisions(world, visits, i, body, decisions)
        return decisions


class KeyartPipeline:
    """The batch side for one lake, on a shared SparkSession."""

    def __init__(self, spark, lake: Lake, settings):
        self.spark = spark
        self.lake = lake
        self.settings = settings
        self.timings: dict[str, float] = {}

    def _job(self, module, ds: str, through: str | None = None) -> None:
        from keyart.jobs.common import run_job

        name = module.__name__.rsplit(".", 1)[-1]
        t0 = time.perf_counter()
        args = argparse.Namespace(ds=ds, through=through, lake=str(self.lake.root), master=None, shuffle_partitions=None)
        run_job(name, module.run, args, spark=self.spark)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def ingest_history(self, first: str, last: str) -> None:
        from keyart.jobs import ingest

        self._job(ingest, first, last)

    def history_affinity(self, ds: str, member_ids: list[str]) -> dict[int, list[tuple[str, float]]]:
        """Member index -> (tag, affinity) of the features job's snapshot as of the end of ``ds``.

        Computed with the job's own ``member_snapshot`` from the ingested plays, not written
        to the lake (the keyart arm's snapshots stay exactly what its DAG writes).
        """
        from keyart.contracts import MEMBERS, PLAYS, TITLES
        from keyart.jobs.common import read_range, read_table
        from keyart.jobs.features import SnapshotParams, member_snapshot

        params = SnapshotParams.from_settings(ds, self.settings)
        plays = read_range(self.spark, self.lake.clean("plays"), shift_ds(ds, -params.history_days), ds, PLAYS.spark_schema())
        snap = member_snapshot(plays, read_table(self.spark, self.lake.titles, TITLES),
                               read_table(self.spark, self.lake.members, MEMBERS), params)
        frame = snap.select("member_id", "affinity_tags", "affinity_values").toPandas()
        pos = {m: i for i, m in enumerate(member_ids)}
        return {pos[m]: list(zip(t, v, strict=True)) for m, t, v in
                zip(frame["member_id"], frame["affinity_tags"], frame["affinity_values"], strict=True)
                if m in pos and len(t)}

    def batch(self, ds: str) -> None:
        """ingest -> rewards -> features -> priors for ``ds`` (the DAG's Spark tasks)."""
        from keyart.jobs import features as features_job
        from keyart.jobs import ingest, priors, rewards

        for module in (ingest, rewards, features_job, priors):
            self._job(module, ds)

    def train_and_export(self, ds: str) -> dict[str, Any]:
        """``train_run`` on the DAG's window of ``ds``, then ``export_bundle``; returns what was used.

        On the first labelled day ``train_run`` itself trains on the early part of the
        held-out day (``cold_start_split``).
        """
        from keyart.models.export import export_bundle
        from keyart.models.train import train_run
        from keyart.policy import PolicyConfig

        t0 = time.perf_counter()
        info = train_run(self.lake, ds, self.settings.training_window_days)
        self.timings["train"] = self.timings.get("train", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = export_bundle(self.lake, ds, PolicyConfig.from_settings(self.settings))
        self.timings["export"] = self.timings.get("export", 0.0) + time.perf_counter() - t0
        valid = info.get("metrics", {}).get("valid", {})
        return {"train_days": info["window"]["days"], "heldout_ds": info["heldout_ds"],
                "cold_start_split": bool(info.get("cold_start_split")), "train_rows": info.get("rows"),
                "valid_auc": valid.get("auc"), "best_iteration": info.get("best_iteration"),
                "bundle": str(self.lake.run_dir(ds) / "bundle"), "version": manifest.version}

    def service(self, bundle_dir: str | Path):
        """A :class:`Service` deciding with the bundle at ``bundle_dir`` (loaded by ``load_bundle``)."""
        from keyart.serving.bundle_store import BundleStore, load_bundle
        from keyart.serving.rewards import EventSigner
        from keyart.serving.service import Service

        t0 = time.perf_counter()
        store = BundleStore(self.settings, uri=str(bundle_dir))
        store.current = load_bundle(Path(bundle_dir), str(bundle_dir), self.settings)
        self.timings["load_bundle"] = self.timings.get("load_bundle", 0.0) + time.perf_counter() - t0
        return Service(store, EventSigner(self.settings.serve_event_secret), self.settings)
