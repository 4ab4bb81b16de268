"""The one place eddy reads its environment: EDDY_* variables and flags become a frozen Settings."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from features.errors import ConfigError, SpecError
from features.spec import parse_duration
from streams.kafka import KafkaConfig, parse_properties

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("faust", "flink", "native")


class Secret:
    """A value that prints as *** everywhere; .reveal() is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Settings:
    """Everything a process of eddy needs to know about where it runs; built once, passed down."""

    home: Path
    kafka: KafkaConfig
    redis_url: str
    lakehouse: str
    pipeline: Path
    device: str
    engine: str
    partitions: int
    scorers: int
    jars_dir: Path
    model_key: Secret = field(repr=False)
    ingest: bool = True                    # run lakehouse ingestion in the stack
    ingest_trigger_s: float = 2.0
    spark_master: str = "local[2]"
    spark_conf: Mapping[str, str] = field(default_factory=dict)   # spark.* settings from EDDY_SPARK_CONF
    retrain_every_labels: int | None = None   # continuous retraining (off unless one of these is set)
    retrain_every_s: float | None = None
    commit_interval_s: float | None = None    # how often each stage commits (None: each stage's default)

    def __repr__(self) -> str:
        return (
            f"Settings(home={str(self.home)!r}, kafka={self.kafka!r}, redis_url={redact_url(self.redis_url)!r}, "
            f"lakehouse={self.lakehouse!r}, pipeline={str(self.pipeline)!r}, device={self.device!r}, "
            f"engine={self.engine!r}, partitions={self.partitions}, scorers={self.scorers}, ingest={self.ingest}, "
            f"spark_master={self.spark_master!r}, model_key=***)"
        )

    @property
    def engine_dir(self) -> Path:
        """The feature engine's own folder: Faust's data, Flink's checkpoints and its JVM's log."""
        return self.home / "engines" / self.engine

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def artifacts_dir(self) -> Path:
        """Model artifacts live under the lakehouse root (a local path in the local stack)."""
        return Path(self.lakehouse.removeprefix("file://")) / "models"

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _model_key(home: Path, value: str | None) -> Secret:
    """EDDY_MODEL_KEY, or a key generated once into EDDY_HOME (readable by the owner only)."""
    if value:
        return Secret(value.encode())
    path = home / "model.key"
    if path.exists():
        return Secret(path.read_bytes().strip())
    home.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return Secret(key)


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (which win) over EDDY_* variables over defaults. ConfigError names the fix."""
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}

    home = Path(flags.get("home") or env.get("EDDY_HOME") or ".eddy").expanduser().resolve()
    properties: dict[str, str] = {}
    config_path = flags.get("kafka_config") or env.get("EDDY_KAFKA_CONFIG")
    if config_path:
        try:
            text = Path(config_path).expanduser().read_text()
        except OSError as exc:
            raise ConfigError(f"EDDY_KAFKA_CONFIG: cannot read {config_path} ({exc.strerror}); point it at a properties file") from None
        properties = parse_properties(text, source=str(config_path))
    kafka = KafkaConfig(flags.get("bootstrap") or env.get("EDDY_KAFKA_BOOTSTRAP") or "127.0.0.1:9092", properties)

    redis_url = flags.get("redis_url") or env.get("EDDY_REDIS_URL") or "redis://127.0.0.1:6379/0"
    if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"EDDY_REDIS_URL: {redact_url(redis_url)!r} is not a redis:// URL; set it like redis://127.0.0.1:6379/0")

    pipeline = Path(flags.get("pipeline") or env.get("EDDY_PIPELINE") or "pipelines/fraud.yaml")
    if not pipeline.is_absolute() and not pipeline.exists() and (REPO_ROOT / pipeline).exists():
        pipeline = REPO_ROOT / pipeline

    device = (flags.get("device") or env.get("EDDY_DEVICE") or "auto").lower()
    if device not in DEVICES:
        raise ConfigError(f"EDDY_DEVICE: {device!r} is not one of {', '.join(DEVICES)}")
    engine = (flags.get("engine") or env.get("EDDY_ENGINE") or "faust").lower()
    if engine not in ENGINES:
        raise ConfigError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    partitions_raw = flags.get("partitions") or env.get("EDDY_PARTITIONS") or 3
    try:
        partitions = int(partitions_raw)
        if partitions < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"EDDY_PARTITIONS: {partitions_raw!r} is not a positive integer") from None

    scorers_raw = flags.get("scorers") or env.get("EDDY_SCORERS") or 1
    try:
        scorers = int(scorers_raw)
        if not 1 <= scorers <= 16:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"EDDY_SCORERS: {scorers_raw!r} is not a number of scorer replicas from 1 to 16") from None

    ingest_raw = str(flags.get("ingest") if "ingest" in flags else env.get("EDDY_INGEST") or "on").lower()
    if ingest_raw not in ("on", "off", "true", "false", "1", "0"):
        raise ConfigError(f"EDDY_INGEST: {ingest_raw!r} is not on or off")
    trigger_s = _duration_s(env, "EDDY_INGEST_TRIGGER", "2s or 500ms", default="2s")
    spark_conf: dict[str, str] = {}
    spark_conf_path = env.get("EDDY_SPARK_CONF")
    if spark_conf_path:
        try:
            spark_conf = parse_properties(Path(spark_conf_path).expanduser().read_text(), source=spark_conf_path)
        except OSError as exc:
            raise ConfigError(f"EDDY_SPARK_CONF: cannot read {spark_conf_path} ({exc.strerror}); "
                              "point it at a properties file of spark.* settings") from None

    every_labels_raw = env.get("EDDY_RETRAIN_EVERY_LABELS")
    try:
        every_labels = int(every_labels_raw) if every_labels_raw else None
        if every_labels is not None and every_labels < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"EDDY_RETRAIN_EVERY_LABELS: {every_labels_raw!r} is not a positive number of labels") from None
    every_s = _duration_s(env, "EDDY_RETRAIN_EVERY", "30m or 6h")
    commit_s = _duration_s(env, "EDDY_COMMIT_INTERVAL", "50ms or 1s")

    return Settings(
        home=home,
        kafka=kafka,
        redis_url=redis_url,
        lakehouse=flags.get("lakehouse") or env.get("EDDY_LAKEHOUSE") or str(home / "lakehouse"),
        pipeline=pipeline,
        device=device,
        engine=engine,
        partitions=partitions,
        scorers=scorers,
        jars_dir=Path(env.get("EDDY_JARS") or REPO_ROOT / ".jars"),
        model_key=_model_key(home, flags.get("model_key") or env.get("EDDY_MODEL_KEY")),
        ingest=ingest_raw in ("on", "true", "1"),
        ingest_trigger_s=trigger_s,
        spark_master=env.get("EDDY_SPARK_MASTER") or "local[2]",
        spark_conf=spark_conf,
        retrain_every_labels=every_labels,
        retrain_every_s=every_s,
        commit_interval_s=commit_s,
    )


def _duration_s(env: Mapping[str, str], name: str, example: str, default: str | None = None) -> float | None:
    """A positive duration setting in seconds (None when unset and no default); ConfigError names the fix."""
    raw = env.get(name) or default
    if not raw:
        return None
    try:
        seconds = parse_duration(raw) / 1000
        if seconds <= 0:
            raise SpecError("not positive")
    except SpecError:
        raise ConfigError(f"{name}: {raw!r} is not a duration like {example}") from None
    return seconds


def child_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process eddy starts: the caller's, with the settings made explicit."""
    env = dict(os.environ)
    env.update(
        EDDY_HOME=str(settings.home),
        EDDY_KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        EDDY_REDIS_URL=settings.redis_url,
        EDDY_LAKEHOUSE=settings.lakehouse,
        EDDY_PIPELINE=str(settings.pipeline),
        EDDY_DEVICE=settings.device,
        EDDY_ENGINE=settings.engine,
        EDDY_PARTITIONS=str(settings.partitions),
        EDDY_SCORERS=str(settings.scorers),
        EDDY_INGEST="on" if settings.ingest else "off",
        EDDY_SPARK_MASTER=settings.spark_master,
        PYTHONUNBUFFERED="1",
    )
    if settings.spark_master.startswith("local"):  # a driver a cluster must reach binds no loopback
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
    if settings.engine == "flink":  # the JVM PyFlink starts logs beside the engine's data, not into pyflink
        env.setdefault("FLINK_LOG_DIR", str(settings.engine_dir / "log"))
    env.update(extra or {})
    return env
