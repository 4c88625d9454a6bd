"""One typed configuration for every part of keyart.

Values come, later ones winning, from: the defaults below (the embedded, one-machine
setup), a YAML file (``keyart.yaml`` in the working directory, or the path in
``KEYART_CONFIG``), then environment variables ``KEYART_<FIELD>`` (for example
``KEYART_LAKE_ROOT=/data/lake``, ``KEYART_SPARK_MASTER=spark://host:7077``).

Every default is one value away from its scaled form: point ``lake_root`` at a mounted
object store, ``mlflow_tracking_uri`` at an ``mlflow server``, ``spark_master`` at a cluster.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PolicyName = Literal["squarecb", "thompson", "egreedy", "greedy", "random", "beta_ts"]


def _home() -> Path:
    return Path(os.environ.get("KEYART_HOME", "var")).resolve()


class Settings(BaseSettings):
    """keyart configuration. Field docs are the reference; the README lists them."""

    model_config = SettingsConfigDict(env_prefix="KEYART_", extra="forbid", frozen=True)

    # --- storage -------------------------------------------------------------------
    home: Path = Field(default_factory=_home, description="Root of local state (lake, MLflow, logs).")
    lake_root: Path | None = Field(default=None, description="Data lake root; default <home>/lake.")

    # --- Spark ---------------------------------------------------------------------
    spark_master: str = Field(default="local[*]", description="Spark master URL.")
    spark_remote: str | None = Field(
        default=None,
        description="Spark Connect URL (sc://host:port). Set, jobs run as Connect clients of that server "
        "(a long-lived driver: no JVM start per job) and spark_master is the server's business.",
    )
    spark_shuffle_partitions: int = Field(default=4, ge=1, description="Shuffle partitions; raise on a cluster (a few per core).")
    spark_driver_memory: str = "4g"

    # --- rewards and features -------------------------------------------------------
    quality_play_minutes: float = Field(default=15.0, gt=0, description="A play of at least this many minutes is a quality play.")
    attribution_window_hours: float = Field(default=4.0, gt=0, le=168, description="A play counts for an impression only if it starts within this window after it.")
    affinity_half_life_days: float = Field(default=30.0, gt=0, description="Half-life of member taste affinities.")
    history_days: int = Field(default=90, ge=1, description="How far back member features read the play log.")
    training_window_days: int = Field(default=7, ge=1, description="Labelled days used to train the reward model.")

    # --- bandit priors --------------------------------------------------------------
    prior_half_life_days: float = Field(default=7.0, gt=0, description="Half-life of yesterday's posterior when warm-starting today's.")
    prior_max_ess: float = Field(default=2000.0, gt=0, description="Cap on a prior's effective sample size (alpha + beta).")
    prior_min_segment_impressions: int = Field(default=200, ge=0, description="Segments with fewer labelled impressions fall back to the artwork prior.")

    # --- policy ---------------------------------------------------------------------
    policy: PolicyName = Field(default="squarecb", description="Exploration policy used by serving and valued offline.")
    policy_floor: float = Field(default=0.01, ge=0, lt=1, description="Minimum probability of every candidate (total floor mass <= 0.5).")
    squarecb_gamma: float = Field(default=3000.0, gt=0, description="SquareCB / inverse-gap-weighting learning rate.")
    egreedy_epsilon: float = Field(default=0.1, ge=0, le=1)
    prior_blend_n0: float = Field(default=50.0, ge=0, description="Model-vs-prior blend: weight on prior grows as the artwork's data shrinks below this.")

    # --- MLflow ---------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(default=None, description="Default sqlite:///<home>/mlflow/mlflow.db.")
    mlflow_artifact_root: str | None = Field(default=None, description="Default <home>/mlflow/artifacts.")
    mlflow_experiment: str = "keyart"
    registered_model: str = "keyart-artwork"
    promotion_margin: float = Field(default=0.0, description="Lower bound of the paired OPE difference challenger - champion must exceed this.")

    # --- data quality ---------------------------------------------------------------
    max_quarantine_rate: float = Field(default=0.05, ge=0, le=1, description="The daily run fails above this quarantined share.")

    # --- serving --------------------------------------------------------------------
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8080, ge=0, le=65535)
    serve_model_uri: str | None = Field(default=None, description="Bundle path or models:/<name>@champion; default the champion alias.")
    serve_poll_seconds: float = Field(default=30.0, gt=0)
    serve_max_titles: int = Field(default=100, ge=1)
    serve_max_artworks: int = Field(default=32, ge=1)
    serve_event_secret: str = Field(default="keyart-dev-secret-change-me", min_length=8, description="HMAC key that signs event ids.")
    serve_log_fsync: Literal["always", "interval"] = "always"
    serve_log_fsync_interval_ms: int = Field(default=5, ge=0)
    serve_log_dir: Path | None = Field(default=None, description="Default <lake_root>/raw/impressions.")
    serve_client_clock: bool = Field(default=False, description="Accept a request's `ts` as the decision/reward time (simulation and log replay only, never in production).")

    # --- simulator ------------------------------------------------------------------
    sim_seed: int = 7
    sim_titles: int = Field(default=200, ge=4)
    sim_members: int = Field(default=20000, ge=10)
    sim_visits_per_day: int = Field(default=20000, ge=1)

    @field_validator("policy_floor")
    @classmethod
    def _floor_ok(cls, v: float) -> float:
        if v > 0.125:
            raise ValueError("policy_floor above 0.125 leaves no room to exploit with 8 candidates")
        return v

    # --- derived ----------------------------------------------------------------------
    @property
    def lake(self) -> Path:
        return Path(self.lake_root) if self.lake_root else self.home / "lake"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.home / "mlflow" / "artifacts")

    @property
    def impression_log_dir(self) -> Path:
        return Path(self.serve_log_dir) if self.serve_log_dir else self.lake / "raw" / "impressions"


def _yaml_values(path: Path | None) -> dict[str, Any]:
    if path is None:
        env_path = os.environ.get("KEYART_CONFIG")
        path = Path(env_path) if env_path else Path("keyart.yaml")
        if not path.exists():
            if env_path:
                raise FileNotFoundError(f"KEYART_CONFIG points at {path}, which does not exist")
            return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must be a mapping of field: value")
    return data


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build settings: defaults < YAML file < environment < explicit overrides."""
    file_values = _yaml_values(path)
    env_keys = {name for name in Settings.model_fields if f"KEYART_{name.upper()}" in os.environ}
    # Environment must beat the file: drop file values the environment sets.
    init = {k: v for k, v in file_values.items() if k not in env_keys}
    init.update(overrides)
    return Settings(**init)


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()
