"""The local single-node KRaft broker: config, storage formatted once, started from the Maven-fetched jars."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from deploy.processes import ProcessTable, free_port, is_loopback, port_holder, port_open
from deploy.settings import Settings, child_environment
from features.errors import ServiceError
from streams.kafka import wait_for_broker

NAME = "broker"
# Sized for a 2-core / 24 GiB machine that also runs Spark, Flink and the scorers.
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]
START_DEADLINE_S = 90.0

LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRefs = stdout
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


@dataclass(frozen=True)
class BrokerInfo:
    managed: bool          # True when this EDDY_HOME started it
    address: str
    start_s: float = 0.0   # start to healthy, when started now
    pid: int | None = None


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise ServiceError(
            "Java 17+ is needed for the local Kafka broker: install it (apt-get install openjdk-17-jre-headless) "
            "or point EDDY_KAFKA_BOOTSTRAP at a running cluster"
        )
    return java


def _classpath(settings: Settings) -> str:
    jars = settings.jars_dir / "kafka"
    if not any(jars.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"the Kafka jars are missing from {jars}: run `make setup`")
    return f"{jars}/*"


def _server_properties(settings: Settings, host: str, port: int, controller_port: int, data: Path) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data}",
        f"num.partitions={settings.partitions}",
        "auto.create.topics.enable=false",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=10",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "group.consumer.min.session.timeout.ms=2000",
        "group.classic.min.session.timeout.ms=2000",
        "log.retention.hours=168",
        "",
    ])


def _controller_port(config: Path) -> int:
    """Keep the controller port across restarts unless something else took it."""
    if config.exists():
        match = re.search(r"CONTROLLER://127\.0\.0\.1:(\d+)", config.read_text())
        if match and not port_open("127.0.0.1", int(match.group(1))):
            return int(match.group(1))
    return free_port()


def ensure_broker(settings: Settings, table: ProcessTable) -> BrokerInfo:
    """Use the cluster EDDY_KAFKA_BOOTSTRAP names, starting a local broker only on a free loopback port."""
    hosts = settings.kafka.hosts
    host, port = hosts[0]
    if len(hosts) > 1 or not is_loopback(host):
        wait_for_broker(settings.kafka, timeout_s=30)
        return BrokerInfo(False, settings.kafka.bootstrap)
    record = table.get(NAME)
    if record is not None and record.alive():
        wait_for_broker(settings.kafka, timeout_s=START_DEADLINE_S)
        return BrokerInfo(True, settings.kafka.bootstrap, pid=record.pid)
    if port_open(host, port):
        try:
            wait_for_broker(settings.kafka, timeout_s=5)
        except ServiceError:
            holder = port_holder(port) or "another process"
            raise ServiceError(
                f"{host}:{port} is held by {holder}, which does not answer as a Kafka broker: "
                "stop it, or set EDDY_KAFKA_BOOTSTRAP to a free port"
            ) from None
        return BrokerInfo(False, settings.kafka.bootstrap)

    java = _java()
    classpath = _classpath(settings)
    root = settings.home / "kafka"
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "server.properties"
    config.write_text(_server_properties(settings, host, port, _controller_port(config), data))
    log4j = root / "log4j2.properties"
    log4j.write_text(LOG4J2)
    jvm = [*JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}"]
    env = child_environment(settings)

    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            [java, *jvm, "-cp", classpath, "kafka.tools.StorageTool", "format",
             f"--cluster-id={cluster_id}", f"--config={config}", "--ignore-formatted"],  # an id may start with '-'
            capture_output=True, text=True, env=env, timeout=120,
        )
        if fmt.returncode != 0:
            table.logs_dir.mkdir(parents=True, exist_ok=True)
            table.log_path(NAME).write_text(fmt.stdout + fmt.stderr)
            raise ServiceError(f"formatting Kafka storage failed (log: {table.log_path(NAME)})")

    record = table.start(NAME, [java, *jvm, "-cp", classpath, "kafka.Kafka", str(config)], env,
                         address=settings.kafka.bootstrap)

    def healthy() -> bool:
        if not port_open(host, port):
            return False
        try:
            wait_for_broker(settings.kafka, timeout_s=5)
            return True
        except ServiceError:
            return False

    took = table.wait_healthy(record, healthy, START_DEADLINE_S, "the Kafka broker")
    return BrokerInfo(True, settings.kafka.bootstrap, took, record.pid)
