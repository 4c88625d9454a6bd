"""One typed configuration for every part of keyart.

Values come, later ones winning, from: the defaults below (the embedded, one-machine
setup), a YAML file (``keyart.yaml`` in the working directory, or the path in
``KEYART_CONFIG``), environment variables ``KEYART_<FIELD>`` (for example
``KEYART_LAKE_ROOT=/data/lake``, ``KEYART_SPARK_MASTER=spark://host:7077``), then the
keyword arguments of ``Settings(...)``. Build settings with ``Settings(**overrides)``, or
read the process-wide copy with :func:`settings`.

Every default is one value away from its scaled form: point ``lake_root`` at a mounted
object store, ``mlflow_tracking_uri`` at an ``mlflow server``, ``spark_master`` at a cluster.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from keyart.policy import (
    BlendN0,
    BlendRule,
    Epsilon,
    Floor,
    Gamma,
    GapUnit,
    PolicyConfig,
    PolicyName,
)

TrainWeighting = Literal["none", "sqrt", "clipped"]
"""How the reward model weights rows of non-uniform logs (keyart.models.reward_model)."""
PromotionEstimator = Literal["replay", "ips", "snips", "dr"]
DEFAULT_PROMOTION_ESTIMATOR = "dr"
"""The OPE estimator the promotion gate reads unless ``promotion_estimator`` says otherwise (docs/mlflow.md)."""

CONFIG_ENV = "KEYART_CONFIG"
DEFAULT_CONFIG_FILE = Path("keyart.yaml")

_POLICY = PolicyConfig()


def config_file() -> Path:
    """The YAML file settings read: ``$KEYART_CONFIG``, else ``keyart.yaml`` in the working
    directory. A missing default file is skipped; a named one that is missing is an error,
    so a typo in the path is not silently replaced by the defaults."""
    named = os.environ.get(CONFIG_ENV)
    if not named:
        return DEFAULT_CONFIG_FILE
    path = Path(named).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV} points at {path}, which is not a file")
    return path


class _YamlMapping(YamlConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ValueError(f"{file_path}: the config file must be a mapping of field: value")
        return data


class Settings(BaseSettings):
    """keyart configuration. Field docs are the reference; the README lists them."""

    model_config = SettingsConfigDict(env_prefix="KEYART_", extra="forbid", frozen=True)

    # --- storage -------------------------------------------------------------------
    home: Path = Field(default_factory=lambda: Path("var").resolve(), description="Root of local state (lake, MLflow, logs).")
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
    spark_bind_address: str = Field(
        default="127.0.0.1",
        description="Address the Spark driver binds and advertises (RPC, block manager, UI). Set a routable one "
        "only where executors run on other machines.")
    spark_ui: bool = Field(default=False, description="Spark's web UI for the jobs (bound to spark_bind_address when on).")
    spark_authenticate_secret: str | None = Field(
        default=None, min_length=16,
        description="Shared secret for spark.authenticate on a standalone master (its master and workers need the "
        "same one). Local masters always authenticate with a secret Spark generates per application.")

    # --- rewards and features -------------------------------------------------------
    quality_play_minutes: float = Field(default=15.0, gt=0, description="A play of at least this many minutes is a quality play.")
    attribution_window_hours: float = Field(default=4.0, gt=0, le=168, description="A play counts for an impression only if it starts within this window after it.")
    late_play_lookback_days: int = Field(
        default=3, ge=0, le=30,
        description="A play delivered in a later partition than the day it started is accepted (clean/late_plays) "
        "when it started at most this many days before the partition's day, and relabels the impressions whose "
        "windows it falls in; older ones are quarantined. 0 = every play must arrive in its own day's partition.")
    rewards_pending_days: int = Field(
        default=7, ge=0, le=90,
        description="An impression whose window closed while the play log was not complete (no completeness "
        "marker) waits this many days for the plays; it is labelled by the first run that sees them complete, "
        "and never labelled if they stay missing (never a negative for missing plays).")
    affinity_half_life_days: float = Field(default=30.0, gt=0, description="Half-life of member taste affinities.")
    history_days: int = Field(default=90, ge=1, description="How far back member features read the play log.")
    embedding_rank: int = Field(
        default=16, ge=0, le=128,
        description="Rank of the member and title factors Spark ML's ALS learns daily from the play log (implicit "
        "feedback on minutes played); 0 = no embeddings (their features are 0).")
    embedding_regularization: float = Field(default=0.1, gt=0, description="ALS regParam of the member/title factors.")
    embedding_alpha: float = Field(
        default=1.0, gt=0,
        description="ALS implicit-feedback alpha: the confidence of a (member, title) pair is 1 + alpha * log1p(minutes), "
        "minutes time-decayed as the affinities are.")
    embedding_iterations: int = Field(default=10, ge=1, le=100, description="ALS iterations (maxIter).")
    embedding_tag_ridge: float = Field(
        default=100.0, gt=0,
        description="Ridge penalty of each artwork tag's response direction (the regression of the quality-play residual "
        "on the member factors over the response window), in pseudo-impressions of an average member: a tag shown "
        "this many times is shrunk halfway towards no direction.")
    training_window_days: int = Field(default=7, ge=1, description="Labelled days used to train the reward model.")
    training_exploration_horizon_days: int = Field(
        default=30, ge=0,
        description="Impressions logged uniformly at random stay in the training set this many days (0 = only the "
        "window): the only logs where every artwork was shown in every context. Default: affinity_half_life_days.")
    train_weighting: TrainWeighting = Field(
        default="none",
        description="Reward-model row weights for non-uniform logs: none, sqrt or clipped (ratio to uniform "
        "logging, clipped at 20); chosen by measurement (docs/models.md).")

    # --- bandit priors --------------------------------------------------------------
    prior_half_life_days: float = Field(
        default=30.0, gt=0,
        description="Half-life of yesterday's posterior when warm-starting today's: the priors remember about "
        "1.44 half-lives of evidence. Default: affinity_half_life_days, the time scale of taste in the features.")
    prior_max_ess: float = Field(
        default=100_000.0, gt=0,
        description="Cap on a prior's effective sample size (alpha + beta): a guard only. The decay already bounds "
        "it at (a day's effective impressions) / (1 - decay); a cap below that would forget faster than the "
        "half-life says and keep well-measured artworks as uncertain as a few days of data.")
    prior_min_segment_impressions: int = Field(default=200, ge=0, description="Segments with fewer labelled impressions fall back to the artwork prior.")
    prior_max_gap_days: int = Field(
        default=90, ge=1,
        description="The priors job warm-starts from the newest earlier priors partition at most this many days "
        "before D, decayed once per day of the gap (a day it did not run must not reset every posterior); older "
        "than that, every artwork starts from the empirical-Bayes prior. Default: three prior half-lives.")

    # --- policy ---------------------------------------------------------------------
    # Flat, so each keeps its own variable; types, rules and defaults are keyart.policy's.
    policy: PolicyName = Field(
        default=_POLICY.name,
        description="Exploration policy used by serving and valued offline. With policy_floor, squarecb_gamma, "
        "squarecb_gap_unit, egreedy_epsilon, prior_blend_n0 and prior_blend (KEYART_POLICY, KEYART_POLICY_FLOOR, "
        "KEYART_SQUARECB_GAMMA, KEYART_SQUARECB_GAP_UNIT, KEYART_EGREEDY_EPSILON, KEYART_PRIOR_BLEND_N0, "
        "KEYART_PRIOR_BLEND) it is "
        "read by keyart.policy.PolicyConfig.from_settings.",
    )
    policy_floor: Floor = _POLICY.floor
    squarecb_gamma: Gamma = _POLICY.gamma
    squarecb_gap_unit: GapUnit = _POLICY.gap_unit
    egreedy_epsilon: Epsilon = _POLICY.epsilon
    prior_blend_n0: BlendN0 = _POLICY.prior_blend_n0
    prior_blend: BlendRule = _POLICY.prior_blend

    # --- MLflow ---------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(default=None, description="Default sqlite:///<home>/mlflow/mlflow.db.")
    mlflow_artifact_root: str | None = Field(default=None, description="Default <home>/mlflow/artifacts.")
    mlflow_experiment: str = "keyart"
    registered_model: str = "keyart-artwork"
    promotion_margin: float = Field(default=0.0, description="A challenger that is not fresher than the champion's model (a backfill, a retrain of the same day) is promoted only when the lower bound of its paired OPE difference challenger - champion exceeds this.")
    promotion_noninferiority_margin: float = Field(default=0.05, ge=0, lt=1, description="delta of the gate's non-inferiority rule, as a fraction of the champion's estimated value: a fresher challenger is promoted unless the pooled paired difference is credibly below -delta * V_champion (docs/mlflow.md).")
    promotion_estimator: PromotionEstimator = Field(default=DEFAULT_PROMOTION_ESTIMATOR, description="OPE estimator of the paired difference challenger - champion the gate decides on (docs/mlflow.md): dr (default: the reward model's prediction as a control variate, unbiased with the logged propensities and with narrower intervals), snips, ips or replay.")
    promotion_pool_days: int = Field(default=7, ge=1, description="The gate pools the paired differences against the same champion model over the held-out days of this many most recent days (today's included).")

    # --- data quality ---------------------------------------------------------------
    max_quarantine_rate: float = Field(default=0.05, ge=0, le=1, description="The daily run fails above this quarantined share.")
    dq_band_days: int = Field(default=7, ge=1, description="Trailing days whose plays per impression and quality-play rate set the data-quality band.")
    dq_band_min_days: int = Field(default=3, ge=1, description="No band until this many of the trailing days have complete plays and impressions.")
    dq_band_low: float = Field(default=0.5, gt=0, lt=1, description="The daily run fails when plays per impression or the quality-play rate is below this times the trailing median.")
    dq_band_high: float = Field(default=2.0, gt=1, description="The daily run fails when plays per impression or the quality-play rate is above this times the trailing median.")

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
    serve_cold_start: Literal["uniform", "default"] = Field(
        default="uniform",
        description="Without a model: show an artwork drawn uniformly from the active candidates (propensity 1/K, "
        "policy random), so the first logs teach every artwork and support offline evaluation; or each title's "
        "default artwork (propensity 1, policy default), which teaches nothing about the others.")
    serve_client_clock: bool = Field(default=False, description="Accept a request's `ts` as the decision/reward time (simulation and log replay only, never in production).")
    serve_dev_mode: bool = Field(default=False, description="Development/demo only: start with the default or a short serve_event_secret (else refused).")
    serve_api_keys: str | None = Field(default=None, description="Comma-separated API keys for /v1/* (KEYART_SERVE_API_KEYS); unset with no keys file = no authentication.")
    serve_api_keys_file: Path | None = Field(default=None, description="File of API keys for /v1/*, one per line ('#' comments); read at start-up.")
    serve_idempotency_ttl_seconds: float = Field(default=600.0, ge=0, description="How long a /v1/artwork request_id (Idempotency-Key) replays its answer; 0 = off.")
    serve_idempotency_max_bytes: int = Field(default=32 << 20, ge=0, description="Memory bound of the idempotency cache (the oldest answers are dropped first).")
    bundle_signing_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs every bundle manifest written (the daily run's export); "
        "default <home>/keys/bundle-signing.pem, generated with its .pub on first use. A path set here must exist.")
    serve_bundle_public_key: Path | None = Field(
        default=None,
        description="Ed25519 public key(s) (PEM, several for a rotation) that bundle signatures must verify with "
        "before serving swaps a bundle in; default <home>/keys/bundle-signing.pub. A path set here must exist.")
    serve_online_sync_seconds: float = Field(
        default=1.0, ge=0,
        description="How often each worker folds the impression and reward lines the other workers logged (same "
        "log directories) into its online priors, so N workers count what one process would; 0 = at start-up only.")
    serve_online_state: Literal["local", "redis"] = Field(
        default="local",
        description="Where the online priors and the reward de-duplication set live: local = in each process, folding "
        "the other workers' logs (same directories); redis = shared by every replica in serve_redis_url.")
    serve_redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="The Redis of serve_online_state=redis.")
    serve_redis_prefix: str = Field(default="keyart:", min_length=1,
                                    description="Prefix of every Redis key of the shared online state (one per deployment).")

    # --- simulator ------------------------------------------------------------------
    sim_seed: int = 7
    sim_titles: int = Field(default=200, ge=4)
    sim_members: int = Field(default=20000, ge=10)
    sim_visits_per_day: int = Field(default=20000, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: explicit keyword arguments, then KEYART_* variables, then the YAML file.
        return init_settings, env_settings, _YamlMapping(settings_cls, yaml_file=config_file())

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


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Process-wide settings, read once (``settings.cache_clear()`` reads them again)."""
    return Settings()
