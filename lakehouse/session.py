"""The one Spark session builder: Delta's extensions and catalog, the Kafka and Delta jars that
`make setup` fetched with Maven (never resolved at run time), local[*] unless told otherwise."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from features.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("eddy.lakehouse.spark")
_VERSIONED_JAR = re.compile(r"^(?P<artifact>.+?)-\d[\w.\-]*\.jar$")

# Kafka client settings whose values must not reach Spark's logs or UI in the clear.
_SECRET_MARKERS = ("password", "secret", "jaas", "token")


@dataclass(frozen=True)
class SparkConfig:
    """What a Spark session of eddy needs: the jars folder, the master, extra Spark settings."""

    jars_dir: Path
    master: str = "local[*]"
    app_name: str = "eddy"
    conf: Mapping[str, str] = field(default_factory=dict)   # any spark.* setting, wins over the defaults
    driver_memory: str = "1g"


def extra_jars(jars_dir: Path) -> list[Path]:
    """The jars under jars_dir/spark that pyspark does not already ship (by artifact name): two
    versions of one library on the classpath is a classic source of NoSuchMethodError."""
    spark_dir = Path(jars_dir) / "spark"
    if not spark_dir.is_dir() or not any(spark_dir.glob("delta-spark*.jar")):
        raise ConfigError(f"the Spark jars are missing under {spark_dir}; run `make setup`")
    import pyspark

    shipped = {_artifact(p.name) for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return sorted(p for p in spark_dir.glob("*.jar") if _artifact(p.name) not in shipped)


def _artifact(jar_name: str) -> str:
    match = _VERSIONED_JAR.match(jar_name)
    return match.group("artifact") if match else jar_name


def session_conf(config: SparkConfig) -> dict[str, str]:
    """Every setting the builder applies (pure: tests read it without starting a JVM)."""
    local = config.master.startswith("local")
    conf = {
        "spark.master": config.master,
        "spark.app.name": config.app_name,
        "spark.jars": ",".join(str(p) for p in extra_jars(config.jars_dir)),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.driver.memory": config.driver_memory,
        "spark.driver.bindAddress": "127.0.0.1" if local else "0.0.0.0",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4" if local else "200",
        # Delta rebuilds a table's snapshot state in this many tasks at each commit of a micro-batch;
        # its default (50) made every 2-second batch cost ~35 s of CPU on two cores.
        "spark.databricks.delta.snapshotPartitions": "2" if local else "50",
        "spark.sql.session.timeZone": "UTC",
        # pyspark 4.2's Arrow path wants pyarrow >= 18; apache-beam pins 16.1: rows travel row-wise.
        "spark.sql.execution.arrow.pyspark.enabled": "false",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        # Small local tables: no adaptive coalescing chatter, and retention below Delta's 7-day
        # floor is the operator's decision (`eddy lakehouse vacuum --retain`).
        "spark.databricks.delta.retentionDurationCheck.enabled": "false",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.redaction.regex": "(?i)secret|password|token|jaas|sasl",
    }
    if local:  # the driver is all of Spark: on loopback, whatever this host's name resolves to
        conf["spark.driver.host"] = "127.0.0.1"
    else:  # a cluster: its processes authenticate to each other and encrypt what they send and spill
        conf.update({"spark.authenticate": "true", "spark.network.crypto.enabled": "true",
                     "spark.io.encryption.enabled": "true"})
    conf.update(config.conf)
    # YARN and Kubernetes make the shared secret per application; a standalone master needs the cluster's.
    if (config.master.startswith("spark://") and conf.get("spark.authenticate") == "true"
            and not conf.get("spark.authenticate.secret")):
        raise ConfigError(f"EDDY_SPARK_MASTER={config.master}: a standalone cluster authenticates with a shared "
                          "secret: put the cluster's spark.authenticate.secret in EDDY_SPARK_CONF (or "
                          "spark.authenticate=false there to run unauthenticated)")
    return conf


def start_session(config: SparkConfig) -> SparkSession:
    """A SparkSession with Delta and the Kafka source; the JVM's log goes where log4j points it,
    and Python sees only WARN and above from Spark."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in session_conf(config).items():
        builder = builder.config(key, value)
    log.info("starting Spark (%s)", config.master)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def kafka_options(bootstrap: str, java_properties: Mapping[str, str]) -> dict[str, str]:
    """Spark's Kafka source options: the bootstrap servers and the shared client settings, already
    spelled as the Java client reads them (the caller translates EDDY_KAFKA_CONFIG), under `kafka.`."""
    return {"kafka.bootstrap.servers": bootstrap, **{f"kafka.{k}": v for k, v in java_properties.items()}}


def redacted(options: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if any(m in k.lower() for m in _SECRET_MARKERS) else v) for k, v in options.items()}
