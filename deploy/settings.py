"""The one place eddy reads its environment: EDDY_* variables and flags become a frozen Settings."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from deploy.home_records import recorded_flink_cluster, recorded_spark_cluster, recorded_store
from deploy.kafka_cluster import cluster_bootstrap
from deploy.security import local_kafka_properties, local_redis_url, passwords
from features.errors import ConfigError, SpecError
from features.spec import PipelineSpec, load_spec, parse_duration
from models.signing import SigningKey, TrustedKeys
from models.store import Artifacts, ObjectStore, is_object_uri
from streams.kafka import KafkaConfig, check_client_security, parse_properties

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_REPLICAS = 16  # scorer replicas and feature-stage workers: at most this many of each
LOCAL_STORE_ACCESS_KEY = "eddy"  # the local object store's one identity; its secret is generated per home
Device = Literal["auto", "cpu", "cuda"]
Engine = Literal["faust", "flink", "native"]
Stages = Literal["auto", "split", "fused"]
Guarantee = Literal["", "exactly_once", "at_least_once"]
DEVICES: tuple[str, ...] = get_args(Device)
ENGINES: tuple[str, ...] = get_args(Engine)
STAGES: tuple[str, ...] = get_args(Stages)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _seconds(value: Any) -> Any:
    """A duration text (500ms, 2s, 30m) as seconds; anything else is left for the float check."""
    if not isinstance(value, str):
        return value
    try:
        seconds = parse_duration(value) / 1000
    except SpecError:
        raise ValueError(value) from None
    if seconds <= 0:
        raise ValueError(value)
    return seconds


Seconds = Annotated[PositiveFloat, BeforeValidator(_seconds)]
_LOWER = BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value)


def _properties(path: Any, variable: str, what: str) -> dict[str, str]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path} ({exc.strerror}); point it at {what}") from None
    return parse_properties(text, source=str(path))


class Settings(BaseSettings):
    """Everything a process of eddy needs to know about where it runs; built once, passed down.

    Each field is read from EDDY_<NAME> (or the variable its alias names); a description is
    what a valid value is, and load_settings puts it into the error for a bad one."""

    model_config = SettingsConfigDict(env_prefix="EDDY_", env_ignore_empty=True, frozen=True, extra="ignore",
                                      arbitrary_types_allowed=True)

    # Fields are checked in this order, so that later ones may use home and kafka_config.
    home: Annotated[Path, AfterValidator(lambda home: home.expanduser().resolve())] = Path(".eddy")
    kafka_config: Path | None = None  # a client properties file (security.protocol, sasl.*, ssl.*)
    kafka_unverified_tls: bool = False  # accept enable.ssl.certificate.verification=false in kafka_config
    # The local broker and Redis without TLS, SCRAM, ACL users or passwords (`eddy up --insecure`): for
    # benchmarks only. By default they run secure, and this home's processes sign in as their roles.
    insecure: bool = Field(False, description="on or off")
    # The local Kafka's broker count (`eddy up --brokers 3`: replication factor 3, min.insync.replicas 2);
    # unset: what this home's cluster was formatted with, or 1. Read only where the local broker starts.
    brokers: int | None = Field(None, ge=1, le=5, description="a number of local brokers from 1 to 5")
    # The bootstrap text, with kafka_config's properties. Defaults are validated too (BaseSettings'
    # validate_default), so _kafka makes this text a KafkaConfig; Field's type says str.
    kafka: Annotated[KafkaConfig, NoDecode] = Field(  # type: ignore[assignment]
        "127.0.0.1:9092", validation_alias="EDDY_KAFKA_BOOTSTRAP")
    # Where the local broker binds its clients' listener when clients reach it at another address (the
    # bootstrap: a port forward, or a proxy in front of it); empty: the bootstrap's own host:port.
    kafka_listen: str = Field("", pattern=r"^$|^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
                              description="host:port, like 127.0.0.1:19092")
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="a redis:// URL; set it like redis://127.0.0.1:6379/0")
    # Where the local redis-server listens when clients reach it at another address (the URL's: a port
    # forward, or a proxy in front of it); empty: the URL's own host:port.
    redis_listen: str = Field("", pattern=r"^$|^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
                              description="host:port, like 127.0.0.1:16379")
    # The local redis-server speaks TLS only (rediss://, the stack's CA); it has ACL users either way.
    redis_tls: bool = Field(False, description="on or off")
    # The local redis-server's memory bound: past it, writes are refused (noeviction, so no dedupe key,
    # online feature or history is ever dropped silently) and the stages wait until there is room.
    redis_maxmemory: Annotated[str, _LOWER] = Field("2gb", pattern=r"^[1-9][0-9]*(b|kb|mb|gb)?$",
                                                    description="a size like 512mb or 2gb")
    lakehouse: str = ""  # empty: home/lakehouse; s3a://bucket/prefix: on the object store below
    # The S3-compatible store of an s3a:// lakehouse and of the model artifacts: its URL (empty: AWS's own),
    # region and keys (empty: the AWS SDKs' own chain: AWS_* variables, a profile, an instance role). On a
    # loopback URL it is this home's own store (`eddy up --object-store` starts it) and its generated keys.
    s3_endpoint: str = Field("", pattern=r"^$|^https?://[A-Za-z0-9.:\[\]-]+/?$",
                             description="an http(s)://host:port URL, like http://127.0.0.1:9000")
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: SecretStr = Field(SecretStr(""))
    pipeline: Path = Path("pipelines/fraud.yaml")
    device: Annotated[Device, _LOWER] = Field("auto", description=f"one of {', '.join(DEVICES)}")
    engine: Annotated[Engine, _LOWER] = Field("native", description=f"one of {', '.join(ENGINES)}")
    # How the online path runs: fused (the native engine, the online store write and the scorer in one process
    # and one transaction per batch: one hop; lower latency, a third of the memory, and, as workers over the
    # partitions, the higher throughput) or split (the engine, the online writer and the scorers apart, two
    # transactional hops: the shape of Faust and Flink, and of scorers scaled apart from the engine). auto, the
    # default: fused with the native engine and one scorer, else split.
    stages: Annotated[Stages, _LOWER] = Field("auto", description=f"one of {', '.join(STAGES)} (fused runs with --engine native)")
    # The delivery guarantee of the native stages; empty: the spec's own (`guarantee:`, exactly_once by default).
    guarantee: Annotated[Guarantee, _LOWER] = Field("", description="exactly_once or at_least_once")
    partitions: PositiveInt = Field(3, description="a positive integer")
    scorers: int = Field(1, ge=1, le=MAX_REPLICAS, description=f"a number of scorer replicas from 1 to {MAX_REPLICAS}")
    # Native feature-stage workers (the engine, or the fused stage) in one consumer group, each a process
    # with its share of the source's partitions, as they would run on separate hosts.
    engine_workers: int = Field(1, ge=1, le=MAX_REPLICAS,
                                description=f"a number of feature-stage workers from 1 to {MAX_REPLICAS}")
    jars_dir: Path = Field(REPO_ROOT / ".jars", validation_alias="EDDY_JARS")
    # The Ed25519 key that signs models (64 hex characters); empty: one generated once into home/model.key.
    # Read only by what signs (signing_key()); scorers get trusted_keys(), public halves only.
    model_key: SecretBytes = Field(b"")  # type: ignore[assignment]
    # The public keys scorers trust (64 hex characters each, comma-separated); empty: the model key's own.
    model_trust: str = ""
    ingest: bool = Field(True, description="on or off")  # run lakehouse ingestion in the stack
    ingest_trigger_s: Seconds = Field(2.0, validation_alias="EDDY_INGEST_TRIGGER",
                                      description="a duration like 2s or 500ms")
    spark_master: str = ""  # empty: this home's local cluster (`eddy up --spark-cluster`) when it made one, else local[2]
    spark_conf: Annotated[Mapping[str, str], NoDecode] = Field(  # spark.* settings from a properties file
        default_factory=dict, validation_alias="EDDY_SPARK_CONF", repr=False)
    # Continuous retraining, off unless one of these is set.
    retrain_every_labels: PositiveInt | None = Field(None, description="a positive number of labels")
    retrain_every_s: Seconds | None = Field(None, validation_alias="EDDY_RETRAIN_EVERY",
                                            description="a duration like 30m or 6h")
    # Drift (models.drift): retrain when a feature's PSI on the serving version passes this bound.
    retrain_on_drift: PositiveFloat | None = Field(None, description="a PSI bound such as 0.2")
    drift_window: int = Field(10_000, ge=0, description="a number of rows (0: no drift measured)")
    # How often the lakehouse stage samples drift into gold.drift and exports live quality and freshness.
    monitor_every_s: Seconds = Field(30.0, validation_alias="EDDY_MONITOR_EVERY",
                                     description="a duration like 30s or 5m")
    # Rollouts (models.rollout): how often the judge looks, and the policy that makes `eddy retrain
    # --publish auto` (and the retrainer) start a rollout instead of swapping every scorer at once.
    rollout_every_s: Seconds = Field(5.0, validation_alias="EDDY_ROLLOUT_EVERY",
                                     description="a duration like 5s or 1m")
    rollout_policy: Path | None = None
    # Every stage serves Prometheus metrics (off: none do, to measure what they cost).
    metrics: bool = Field(True, description="on or off")
    # A local Prometheus scraping every stage, with eddy's rules (`eddy up --monitoring`).
    monitoring: bool = Field(False, description="on or off")
    # The local Prometheus's alerts fire after at most this hold (None: each rule's own `for`).
    alert_for_s: Seconds | None = Field(None, validation_alias="EDDY_ALERT_FOR",
                                        description="a duration like 10s or 1m")
    # The port each stage serves /metrics and /ready on (0: any free one, found through run/targets/).
    metrics_port: int = Field(0, ge=0, le=65535, description="a port number, or 0 for any free one")
    # A Flink standalone session cluster for the Flink engine (deploy.flink_cluster): its JobManager's REST
    # host:port, where eddy starts one when the address is a free loopback port. Empty: PyFlink's local
    # mini-cluster inside the engine's process.
    flink_cluster: str = Field("", pattern=r"^$|^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$",
                               description="host:port, like 127.0.0.1:8081")
    flink_taskmanagers: int = Field(2, ge=1, le=8, description="a number of TaskManagers from 1 to 8")
    # The job's parallelism on the cluster; None: one subtask per TaskManager (each has one slot).
    flink_parallelism: PositiveInt | None = Field(None, description="a positive integer")
    # Where the cluster's job checkpoints (a URI every TaskManager reaches: file://, s3://); empty:
    # home/flink/checkpoints, which only TaskManagers on this host reach.
    flink_checkpoints: str = ""
    # How often each stage commits (None: each stage's default).
    commit_interval_s: Seconds | None = Field(None, validation_alias="EDDY_COMMIT_INTERVAL",
                                              description="a duration like 50ms or 1s")

    @field_validator("stages")
    @classmethod
    def _fused_needs_native(cls, stages: str, info: ValidationInfo) -> str:
        if stages == "fused" and info.data.get("engine", "native") != "native":
            raise ValueError(f"{stages!r} with engine {info.data.get('engine')!r}")
        return stages

    def pipeline_spec(self) -> PipelineSpec:
        """The pipeline spec, with EDDY_GUARANTEE over its own guarantee; ConfigError for at-least-once
        with an engine that delivers exactly once only."""
        spec = load_spec(self.pipeline)
        if self.guarantee:
            spec = replace(spec, guarantee=self.guarantee)
        if spec.guarantee == "at_least_once" and self.engine != "native":
            raise ConfigError(f"the at_least_once guarantee runs with the native engine (--engine native); "
                              f"the {self.engine} engine delivers exactly once: unset EDDY_GUARANTEE or the "
                              f"spec's guarantee")
        return spec

    @property
    def fused(self) -> bool:
        """Whether the online path runs as the fused stage (models.fused)."""
        return self.engine == "native" and (self.stages == "fused" or (self.stages == "auto" and self.scorers == 1))

    @field_validator("kafka", mode="before")
    @classmethod
    def _kafka(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, KafkaConfig):
            return value
        config = info.data.get("kafka_config")
        properties = _properties(config, "EDDY_KAFKA_CONFIG", "a properties file") if config else {}
        check_client_security(properties, info.data.get("kafka_unverified_tls", False), f"EDDY_KAFKA_CONFIG ({config})")
        if "home" in info.data:  # the first broker of this home's local cluster names all of them
            value = cluster_bootstrap(info.data["home"], str(value))
        if not config and "home" in info.data:  # this home's secure local broker: the CLI signs in as admin
            properties = local_kafka_properties(info.data["home"], str(value)) or {}
        # EDDY_KAFKA_BOOTSTRAP names the brokers, whatever a client file says
        return KafkaConfig(str(value), {k: v for k, v in properties.items()
                                        if k not in ("bootstrap.servers", "metadata.broker.list")})

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str, info: ValidationInfo) -> str:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("not a redis URL")
        # this home's local Redis with ACL users: the CLI signs in as admin
        return (local_redis_url(info.data["home"], url) or url) if "home" in info.data else url

    @field_validator("lakehouse", mode="before")
    @classmethod
    def _lakehouse_under_home(cls, value: Any, info: ValidationInfo) -> Any:
        if value or "home" not in info.data:
            return value
        recorded = recorded_store(info.data["home"])  # this home's stack keeps its lake on its object store
        return recorded["lakehouse"] if recorded else str(info.data["home"] / "lakehouse")

    @field_validator("s3_endpoint", mode="before")
    @classmethod
    def _recorded_endpoint(cls, value: Any, info: ValidationInfo) -> Any:
        if value or "home" not in info.data or not is_object_uri(str(info.data.get("lakehouse", ""))):
            return value
        recorded = recorded_store(info.data["home"])
        return recorded["endpoint"] if recorded and recorded["lakehouse"] == info.data["lakehouse"] else value

    @field_validator("spark_master", "flink_cluster", mode="before")
    @classmethod
    def _recorded_cluster(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: the cluster `eddy up --spark-cluster` / `--flink-cluster` made for this home, else the default."""
        default, read, key = (("local[2]", recorded_spark_cluster, "master") if info.field_name == "spark_master"
                              else ("", recorded_flink_cluster, "rest"))
        if value or "home" not in info.data:
            return value or default
        recorded = read(info.data["home"])
        return recorded[key] if recorded else default

    @field_validator("pipeline")
    @classmethod
    def _pipeline_in_repo(cls, pipeline: Path) -> Path:
        """A relative path that is not here but is in the repository means the repository's file."""
        if not pipeline.is_absolute() and not pipeline.exists() and (REPO_ROOT / pipeline).exists():
            return REPO_ROOT / pipeline
        return pipeline

    @field_validator("model_key", mode="before")
    @classmethod
    def _model_key(cls, value: Any) -> Any:
        if value:
            SigningKey.from_hex(value.decode() if isinstance(value, bytes) else str(value))  # one line if malformed
        return value

    @field_validator("model_trust")
    @classmethod
    def _model_trust(cls, value: str) -> str:
        if value.strip():
            TrustedKeys.parse(value)
        return value

    def signing_key(self) -> SigningKey:
        """The private key that signs models: EDDY_MODEL_KEY, or the one generated once into home."""
        text = self.model_key.get_secret_value() or stored_key(self.home)
        return SigningKey.from_hex(text.decode(), "EDDY_MODEL_KEY" if self.model_key.get_secret_value()
                                   else str(self.home / "model.key"))

    def trusted_keys(self) -> TrustedKeys:
        """The public keys whose models are served: EDDY_MODEL_TRUST, else the model key's own public half."""
        if self.model_trust.strip():
            return TrustedKeys.parse(self.model_trust)
        return self.signing_key().public()

    @field_validator("spark_conf", mode="before")
    @classmethod
    def _spark_conf(cls, value: Any) -> Any:
        if isinstance(value, str | Path):
            return _properties(value, "EDDY_SPARK_CONF", "a properties file of spark.* settings")
        return value

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value

    @property
    def engine_dir(self) -> Path:
        """The feature engine's own folder: Faust's data, Flink's checkpoints and its JVM's log."""
        return self.home / "engines" / self.engine

    @property
    def flink_checkpoint_uri(self) -> str:
        """The Flink cluster's checkpoint storage: EDDY_FLINK_CHECKPOINTS, else beside an object-store lakehouse
        (s3://<bucket>/<prefix>/_flink/checkpoints), else a folder of this home."""
        if self.flink_checkpoints:
            return self.flink_checkpoints
        if self.object_store is not None:
            parts = urlsplit(self.lakehouse)
            return f"s3://{parts.netloc}{parts.path.rstrip('/')}/_flink/checkpoints"
        return (self.home / "flink" / "checkpoints").as_uri()

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def object_store(self) -> ObjectStore | None:
        """The store of an s3a:// lakehouse (None for a local one), with this home's own keys when it is the
        local store and no keys are given."""
        if not is_object_uri(self.lakehouse):
            return None
        access, secret = self.s3_access_key, self.s3_secret_key.get_secret_value()
        if not access and (urlsplit(self.s3_endpoint).hostname or "") in ("127.0.0.1", "localhost", "::1"):
            access, secret = LOCAL_STORE_ACCESS_KEY, passwords(self.home, [LOCAL_STORE_ACCESS_KEY])[LOCAL_STORE_ACCESS_KEY]
        return ObjectStore(self.s3_endpoint, self.s3_region, access, secret)

    @property
    def artifacts(self) -> Artifacts:
        """Model artifacts: under a local lakehouse's root; with an object store, saved under home/models and
        published to the lakehouse's bucket, beside its tables, where every host fetches them."""
        store = self.object_store
        if store is None:
            return Artifacts(Path(self.lakehouse.removeprefix("file://")) / "models")
        parts = urlsplit(self.lakehouse)
        return Artifacts(self.home / "models", f"s3://{parts.netloc}{parts.path.rstrip('/')}/models", store)

    @property
    def artifacts_dir(self) -> Path:
        """Where this host saves and reads model artifacts (settings.artifacts.local)."""
        return self.artifacts.local

    def with_overrides(self, **changes: Any) -> Settings:
        return self.model_copy(update={k: v for k, v in changes.items() if v is not None})


def stored_key(home: Path) -> bytes:
    """The model key generated once into EDDY_HOME (readable by the owner only; a file that others
    could read or that another user owns is refused)."""
    path = home / "model.key"
    if path.exists():
        info = path.stat()
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise ConfigError(f"{path}: the model key must be owned by this user with mode 0600 "
                              f"(it is {info.st_mode & 0o777:o}, owner uid {info.st_uid}); chmod 600 it")
        return path.read_bytes().strip()
    home.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class _Variables(EnvSettingsSource):
    """The EDDY_* variables of the mapping load_settings was given (os.environ, or a test's dict)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(Settings)
        self.env_vars = parse_env_vars(environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


_FLAG_NAMES = {"bootstrap": "EDDY_KAFKA_BOOTSTRAP"}  # flags are field names, or the alias of a field that has one


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (which win) over EDDY_* variables over defaults. ConfigError names the fix."""
    given = {_FLAG_NAMES.get(k, k): v for k, v in (flags or {}).items() if v is not None}
    sources = (InitSettingsSource(Settings, given), _Variables(os.environ if environ is None else environ))
    try:
        return Settings(_build_sources=(sources, {}))  # pydantic-settings' way to pass sources built per call
    except ValidationError as exc:
        raise ConfigError(_problem(exc.errors()[0], given)) from None


def _problem(error: Mapping[str, Any], flags: Mapping[str, Any]) -> str:
    """One line for the first bad value: the flag or variable it came from, the value, what a valid one is."""
    key = str(error["loc"][0])  # the field's alias (its variable) where it has one, else its name
    name, field = next((n, f) for n, f in Settings.model_fields.items() if key in (n, f.validation_alias))
    if field.validation_alias:
        where = key
    elif key in flags:
        where = "--" + key.replace("_", "-")
    else:
        where = f"EDDY_{key.upper()}"
    value = redact_url(error["input"]) if name == "redis_url" else error["input"]
    valid = field.description or f"valid ({error['msg']})"
    return f"{where}: {value!r} is not {valid}"


def local_credentials(settings: Settings) -> Settings:
    """`settings` signed in as admin to this home's secure local broker and Redis, once they run (settings
    loaded before `eddy up` made the credentials have none); unchanged for other clusters."""
    changes: dict[str, Any] = {}
    bootstrap = cluster_bootstrap(settings.home, settings.kafka.bootstrap)  # a cluster `eddy up` just formatted
    if settings.kafka_config is None and (props := local_kafka_properties(settings.home, bootstrap)):
        changes["kafka"] = KafkaConfig(bootstrap, props)
    elif bootstrap != settings.kafka.bootstrap:
        changes["kafka"] = KafkaConfig(bootstrap, settings.kafka.properties)
    if (url := local_redis_url(settings.home, settings.redis_url)) is not None:
        changes["redis_url"] = url
    return settings.model_copy(update=changes) if changes else settings
