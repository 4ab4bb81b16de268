"""The local single-node KRaft broker: config, storage formatted once, started from the Maven-fetched jars."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException

from deploy import security
from deploy.access import ROLES, kafka_acls
from deploy.environment import child_environment
from deploy.kafka_cluster import Cluster, record_cluster, recorded_cluster
from deploy.processes import ProcessTable, Record, free_port, is_loopback, listen_address, port_holder, port_open
from deploy.security import ADMIN, BROKER_PRINCIPAL, SCRAM_MECHANISM, Pki
from deploy.settings import Settings, local_credentials
from features.errors import ConfigError, ServiceError
from features.spec import PipelineSpec
from streams.kafka import KafkaConfig, admin, wait_for_broker

NAME = "broker"
# The lone broker's controller runs as a process of its own. A combined broker and controller that is
# killed restarts leading its partitions at the old epoch, and loses them for half a second when it
# re-registers: its transaction coordinator, finishing a commit it had begun, skipped the markers of the
# partitions that were leaderless then and split the transaction (docs/reliability.md). A controller that
# stays up fences the dead broker, so the broker comes back from a metadata log that has it fenced.
CONTROLLER = "controller"
CONTROLLER_NODE = 0
# Sized for a 2-core / 24 GiB machine that also runs Spark, Flink and the scorers.
JVM_OPTS = ["-Xms256m", "-Xmx1g", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]
CONTROLLER_JVM_OPTS = ["-Xms64m", "-Xmx256m", *JVM_OPTS[2:]]
START_DEADLINE_S = 90.0
# deploy.access's operation names (Strimzi's) as confluent-kafka's AclOperation names them.
_OPERATIONS = {"Read": "READ", "Write": "WRITE", "Describe": "DESCRIBE", "Create": "CREATE",
               "DescribeConfigs": "DESCRIBE_CONFIGS", "All": "ALL"}

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
    controller_s: float = 0.0  # the lone broker's own controller: start to listening, when started now


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


def _voters(ports: dict[int, dict[str, int]], controller: int | None) -> str:
    """controller.quorum.voters: the lone controller node (CONTROLLER_NODE) on port `controller`, or every
    node of `ports` (each a combined broker and controller)."""
    if controller is not None:
        return f"{CONTROLLER_NODE}@127.0.0.1:{controller}"
    return ",".join(f"{n}@127.0.0.1:{p['CONTROLLER']}" for n, p in sorted(ports.items()))


def _tls(pki: Pki) -> list[str]:
    """The TLS and authorization settings every secure node shares: PEM key and CA, client certificates
    required on the internal and controller listeners, the StandardAuthorizer (no ACL: no access)."""
    return [
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={pki.server_pem}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={pki.ca}",
        "listener.name.internal.ssl.client.auth=required",
        "listener.name.controller.ssl.client.auth=required",
        # a certificate's CN is its principal: the broker is User:broker on its own listeners
        "ssl.principal.mapping.rules=RULE:^CN=([a-zA-Z0-9._-]+)$/$1/,DEFAULT",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        f"super.users=User:{BROKER_PRINCIPAL};User:{ADMIN}",
    ]


def _controller_properties(settings: Settings, port: int, data: Path, pki: Pki | None) -> str:
    """The lone broker's controller, a process of its own (the single-broker stack): the quorum's only voter
    on 127.0.0.1:port, mTLS (or plaintext with pki None). It applies the topic defaults, so it has them too."""
    protocol = "PLAINTEXT" if pki is None else "SSL"
    return "\n".join([
        "process.roles=controller",
        f"node.id={CONTROLLER_NODE}",
        f"controller.quorum.voters={_voters({}, port)}",
        f"listeners=CONTROLLER://127.0.0.1:{port}",
        f"listener.security.protocol.map=CONTROLLER:{protocol}",
        *([] if pki is None else _tls(pki)),
        *_common(settings, data, 1),
    ])


def _server_properties(settings: Settings, node: int, host: str, port: int, ports: dict[int, dict[str, int]],
                       data: Path, pki: Pki | None, bind: tuple[str, int], controller: int | None) -> str:
    """Broker `node`'s config: SASL_SSL with SCRAM for clients and the StandardAuthorizer (no ACL: no
    access), mTLS between brokers and controllers; or, with pki None (`--insecure`), plaintext and no
    authorizer. The clients' listener binds `bind` and is advertised as host:port (the same, unless
    EDDY_KAFKA_LISTEN). With `controller` (a port), the node is a broker only and that port's process is its
    controller; without, every node is a broker and a controller in one process, each a voter. With three or
    more nodes every topic, internal ones included, has three replicas and takes a write once two have it, so
    a broker can die without losing an acknowledged record."""
    internal, clients = ports[node]["INTERNAL"], ports[node]["CLIENTS"]
    own_controller = "" if controller is not None else f",CONTROLLER://127.0.0.1:{ports[node]['CONTROLLER']}"
    bound = f"{bind[0]}:{bind[1]}"
    if pki is None:
        security = [
            f"listeners=PLAINTEXT://{bound}{own_controller}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
        ]
    else:
        security = [
            f"listeners=SASL_SSL://{bound},CLIENTS://{host}:{clients},INTERNAL://127.0.0.1:{internal}{own_controller}",
            f"advertised.listeners=SASL_SSL://{host}:{port},CLIENTS://{host}:{clients},INTERNAL://127.0.0.1:{internal}",
            "listener.security.protocol.map=SASL_SSL:SASL_SSL,CLIENTS:SSL,INTERNAL:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name=INTERNAL",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.clients.ssl.client.auth=required",  # people's own tools, by client certificate
            *_tls(pki),
        ]
    return "\n".join([
        "process.roles=broker" if controller is not None else "process.roles=broker,controller",
        f"node.id={node}",
        f"controller.quorum.voters={_voters(ports, controller)}",
        *security,
        *_common(settings, data, len(ports)),
    ])


def _common(settings: Settings, data: Path, nodes: int) -> list[str]:
    """What every node's config holds: its storage, and the topic defaults for a cluster of `nodes` brokers."""
    replicas = min(nodes, 3)
    in_sync = 2 if replicas >= 3 else 1
    return [
        "controller.listener.names=CONTROLLER",
        f"log.dirs={data}",
        f"num.partitions={settings.partitions}",
        "auto.create.topics.enable=false",
        f"default.replication.factor={replicas}",
        f"min.insync.replicas={in_sync}",
        "unclean.leader.election.enable=false",
        f"offsets.topic.replication.factor={replicas}",
        "offsets.topic.num.partitions=10",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={in_sync}",
        "transaction.state.log.num.partitions=10",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={in_sync}",
        "group.initial.rebalance.delay.ms=0",
        "group.consumer.min.session.timeout.ms=2000",
        "group.classic.min.session.timeout.ms=2000",
        "log.retention.hours=168",
        "",
    ]


def _kept_ports(config: Path, taken: set[int], running: bool,
                listeners: tuple[str, ...] = ("CONTROLLER", "INTERNAL", "CLIENTS")) -> dict[str, int]:
    """A node's listeners' ports (by default its controller, internal and clients' ones), kept across
    restarts (and kept as they are while the node runs) unless something else took one; none of them in
    `taken`, which grows by them."""
    text = config.read_text() if config.exists() else ""
    ports: dict[str, int] = {}
    for listener in listeners:
        match = re.search(rf"{listener}://[^:]+:(\d+)", text)
        if match and int(match.group(1)) not in taken and (running or not port_open("127.0.0.1", int(match.group(1)))):
            ports[listener] = int(match.group(1))
        else:
            port = free_port()
            while port in taken:
                port = free_port()
            ports[listener] = port
        taken.add(ports[listener])
    return ports


def _secure(config: Path) -> bool | None:
    """Whether the broker config at `config` is the secure one (None: there is none)."""
    return "SASL_SSL://" in config.read_text() if config.exists() else None


def node_name(node: int) -> str:
    """The process name of local broker `node` (the first is plain `broker`)."""
    return NAME if node == 1 else f"{NAME}-{node}"


def is_node(name: str) -> bool:
    """Whether `name` is a process of the local Kafka cluster: a broker, or the lone broker's controller."""
    return name in (NAME, CONTROLLER) or re.fullmatch(rf"{NAME}-\d+", name) is not None


def _node_root(home: Path, node: int) -> Path:
    return home / ("kafka" if node == 1 else f"kafka-{node}")


def _controller_root(home: Path) -> Path:
    return home / "kafka-controller"


def internal_config(settings: Settings, pki: Pki, node: int = 1) -> KafkaConfig:
    """A broker's own identity on its internal listener (mutual TLS, User:broker, a super user)."""
    config = _node_root(settings.home, node) / "server.properties"
    match = re.search(r"INTERNAL://127\.0\.0\.1:(\d+)", config.read_text())
    if match is None:
        raise ServiceError(f"{config} has no internal listener: `eddy down`, then `eddy up` again")
    return KafkaConfig(f"127.0.0.1:{match.group(1)}", {
        "security.protocol": "SSL", "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.server_cert), "ssl.key.location": str(pki.server_key)})


def _local_addresses(settings: Settings) -> list[tuple[str, int]] | None:
    """The client addresses of the brokers this home runs or is to run; None when the bootstrap names a
    cluster eddy does not run."""
    hosts = settings.kafka.hosts
    recorded = recorded_cluster(settings.home)
    if recorded is not None and settings.kafka.bootstrap == recorded.bootstrap:
        return hosts
    return hosts if len(hosts) == 1 and is_loopback(hosts[0][0]) else None


def _cluster(settings: Settings, host: str, port: int) -> Cluster:
    """This home's cluster, first broker at host:port: as recorded, or new (an id, free ports for brokers 2
    to N). Its size is fixed once its storage is formatted."""
    recorded = recorded_cluster(settings.home)
    meta = settings.home / "kafka" / "data" / "meta.properties"
    have = len(recorded.addresses) if recorded else (1 if meta.exists() else None)
    wanted = settings.brokers or have or 1
    if have is not None and have != wanted:
        raise ServiceError(f"the local Kafka in {settings.home} has {have} broker(s): `eddy up --brokers {have}`, or "
                           f"`eddy down` and remove {settings.home}/kafka* (its topics go too) to start it with {wanted}")
    if wanted > 1 and settings.kafka_listen:
        raise ConfigError("EDDY_KAFKA_LISTEN moves a single local broker: unset it, or run one broker (--brokers 1)")
    first = f"{host}:{port}"
    if recorded is not None:
        return Cluster(recorded.cluster_id, (first, *recorded.addresses[1:]), recorded.controller)
    found = re.search(r"cluster\.id=(\S+)", meta.read_text()) if meta.exists() else None
    cluster_id = found.group(1) if found else base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    others: list[str] = []
    while len(others) < wanted - 1:
        candidate = f"{host}:{free_port()}"
        if candidate != first and candidate not in others:
            others.append(candidate)
    # A new lone broker gets a controller of its own (a storage formatted combined stays combined).
    return Cluster(cluster_id, (first, *others), controller=wanted == 1 and not meta.exists())


def ensure_broker(settings: Settings, table: ProcessTable) -> BrokerInfo:
    """Use the cluster EDDY_KAFKA_BOOTSTRAP names, starting the local brokers (one, or `--brokers N`) that do
    not run, only on free loopback ports: secure (SASL_SSL, SCRAM, ACLs) unless settings.insecure. The info
    is the first broker's; its address names them all."""
    addresses = _local_addresses(settings)
    if addresses is None:
        wait_for_broker(settings.kafka, timeout_s=30)
        return BrokerInfo(False, settings.kafka.bootstrap)
    host, port = addresses[0]
    config = settings.home / "kafka" / "server.properties"
    cluster = _cluster(settings, host, port)
    nodes = range(1, len(cluster.addresses) + 1)
    full = settings.model_copy(update={"kafka": KafkaConfig(cluster.bootstrap, settings.kafka.properties)})
    running = {n for n in nodes if (r := table.get(node_name(n))) is not None and r.alive()}
    controller_up = (r := table.get(CONTROLLER)) is not None and r.alive()
    if running and _secure(config) == settings.insecure:
        running_as, wanted = ("secure", "--insecure") if settings.insecure else ("plaintext (--insecure)", "secure")
        raise ServiceError(f"the local broker runs {running_as}: `eddy down` first to start it {wanted}")
    if len(running) == len(nodes) and (controller_up or not cluster.controller):
        if not settings.insecure and security.local_kafka_properties(settings.home, cluster.bootstrap) is None:
            known = security.ensure_pki(settings.home, [host])  # a start that failed before the roles existed
            wait_for_broker(internal_config(settings, known), timeout_s=START_DEADLINE_S)
            _create_principals(full, internal_config(settings, known), known)
        wait_for_broker(local_credentials(full).kafka, timeout_s=START_DEADLINE_S)
        return BrokerInfo(True, cluster.bootstrap, pid=table.get(NAME).pid)  # type: ignore[union-attr]
    bind = listen_address("EDDY_KAFKA_LISTEN", settings.kafka_listen, host, port, "127.0.0.1:19092")
    if not running and not controller_up and port_open(*bind):
        try:
            wait_for_broker(settings.kafka, timeout_s=5)
        except ServiceError:
            holder = port_holder(bind[1]) or "another process"
            raise ServiceError(
                f"{bind[0]}:{bind[1]} is held by {holder}, which does not answer as a Kafka broker: "
                "stop it, or set EDDY_KAFKA_BOOTSTRAP to a free port"
            ) from None
        return BrokerInfo(False, settings.kafka.bootstrap)

    pki = None if settings.insecure else security.ensure_pki(settings.home, [host])
    if pki is None:
        security.forget_clients(settings.home, "kafka")
    record_cluster(settings.home, cluster)
    taken = {int(a.rpartition(":")[2]) for a in cluster.addresses}
    listeners = ("INTERNAL", "CLIENTS") if cluster.controller else ("CONTROLLER", "INTERNAL", "CLIENTS")
    ports = {n: _kept_ports(_node_root(settings.home, n) / "server.properties", taken, n in running, listeners)
             for n in nodes}
    binds = {n: bind if n == 1 else (host, int(cluster.addresses[n - 1].rpartition(":")[2])) for n in nodes}
    took = controller_s = 0.0
    controller = launched = None
    if cluster.controller:
        root = _controller_root(settings.home)
        quorum = controller = _kept_ports(root / "server.properties", taken, controller_up, ("CONTROLLER",))["CONTROLLER"]
        if not controller_up:
            launched = _launch(full, table, CONTROLLER, root, _controller_properties(full, quorum, root / "data", pki),
                               cluster.cluster_id, f"127.0.0.1:{quorum}", CONTROLLER_JVM_OPTS)
    # The brokers start beside the controller: each waits for the quorum by itself, so the two JVMs boot at once.
    started = [(n, _start_node(full, table, n, ports, binds[n], pki, cluster.cluster_id, controller))
               for n in nodes if n not in running]
    if launched is not None:
        controller_s = table.wait_healthy(launched, lambda: port_open("127.0.0.1", quorum), START_DEADLINE_S,
                                          "the Kafka controller")
    for n, record in started:
        # Until the roles' credentials exist, only the broker's own certificate gets in.
        probe = settings.kafka if pki is None else internal_config(settings, pki, n)

        def healthy(probe: KafkaConfig = probe, bound: tuple[str, int] = binds[n]) -> bool:
            if not port_open(*bound):
                return False
            try:  # up once every broker of the cluster is registered (a lone node of three has no quorum)
                return wait_for_broker(probe, timeout_s=5) >= len(nodes)
            except ServiceError:
                return False

        what = "the Kafka broker" if len(nodes) == 1 else f"Kafka broker {n}"
        took = max(took, table.wait_healthy(record, healthy, START_DEADLINE_S, what))
    if pki is not None:
        _create_principals(full, internal_config(settings, pki), pki)
    return BrokerInfo(True, cluster.bootstrap, took, table.get(NAME).pid, controller_s)  # type: ignore[union-attr]


def _start_node(settings: Settings, table: ProcessTable, node: int, ports: dict[int, dict[str, int]],
                bind: tuple[str, int], pki: Pki | None, cluster_id: str, controller: int | None) -> Record:
    """Write broker `node`'s config, format its storage the first time, and start it (not waiting)."""
    host, port = settings.kafka.hosts[node - 1]
    root = _node_root(settings.home, node)
    config = _server_properties(settings, node, host, port, ports, root / "data", pki, bind, controller)
    return _launch(settings, table, node_name(node), root, config, cluster_id, f"{host}:{port}", JVM_OPTS)


def _launch(settings: Settings, table: ProcessTable, name: str, root: Path, config_text: str, cluster_id: str,
            address: str, jvm_opts: list[str]) -> Record:
    """Write process `name`'s config into root (config_text keeps its storage in root/data), format the
    storage the first time, and start it (not waiting)."""
    config, log4j, data = root / "server.properties", root / "log4j2.properties", root / "data"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(config_text)
    log4j.write_text(LOG4J2)
    java, jvm, env = _java(), [*jvm_opts, f"-Dlog4j2.configurationFile={log4j}"], child_environment(settings)
    classpath = _classpath(settings)
    if not (data / "meta.properties").exists():
        fmt = subprocess.run(
            [java, *jvm, "-cp", classpath, "kafka.tools.StorageTool", "format",
             f"--cluster-id={cluster_id}", f"--config={config}", "--ignore-formatted"],  # an id may start with '-'
            capture_output=True, text=True, env=env, timeout=120,
        )
        if fmt.returncode != 0:
            table.logs_dir.mkdir(parents=True, exist_ok=True)
            table.log_path(name).write_text(fmt.stdout + fmt.stderr)
            raise ServiceError(f"formatting Kafka storage failed (log: {table.log_path(name)})")
    return table.start(name, [java, *jvm, "-cp", classpath, "kafka.Kafka", str(config)], env, address=address)


def _create_principals(settings: Settings, internal: KafkaConfig, pki: Pki) -> None:
    """Give every role its SCRAM credential (kept across restarts: the passwords are made once) and write
    the roles' client files; returns once the admin's credential lets it in."""
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    known = security.passwords(settings.home, ROLES)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, security.SCRAM_ITERATIONS)
    client = admin(internal)  # held until every future is done: the futures die with the client
    # Only the roles without one: the passwords never change, and a credential replaced while clients
    # sign in again after a restart fails their handshakes midway.
    have = set()
    for user, future in client.describe_user_scram_credentials(list(ROLES)).items():
        try:
            future.result(30)
            have.add(user)
        except KafkaException:
            continue  # no credential yet (RESOURCE_NOT_FOUND)
    upserts = [UserScramCredentialUpsertion(role, info, known[role].encode()) for role in ROLES if role not in have]
    for user, future in (client.alter_user_scram_credentials(upserts).items() if upserts else ()):
        try:
            future.result(30)
        except KafkaException as exc:
            raise ServiceError(f"could not create the Kafka principal {user!r}: {exc.args[0].str()}") from None
    security.write_kafka_clients(settings.home, settings.kafka.bootstrap, ROLES, pki.ca)
    match = re.search(r"advertised.listeners=.*CLIENTS://([^,\s]+)", (settings.home / "kafka" / "server.properties").read_text())
    if match:
        security.write_outside_clients(settings.home, match.group(1))
    wait_for_broker(local_credentials(settings).kafka, timeout_s=30)


def grant(settings: Settings, spec: PipelineSpec) -> int:
    """Create the spec's ACLs (deploy.access) on the local secure broker: each role may do what its
    stages need and nothing else. Idempotent; returns the number of ACL bindings."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    kinds = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP, "transactionalId": ResourceType.TRANSACTIONAL_ID,
             "cluster": ResourceType.BROKER}
    bindings = []
    for role, rules in kafka_acls(spec).items():
        if role == ADMIN:  # a super user: it needs no ACL
            continue
        for rule in rules:
            res = rule["resource"]
            pattern = ResourcePatternType.PREFIXED if res.get("patternType") == "prefix" else ResourcePatternType.LITERAL
            for operation in rule["operations"]:
                bindings.append(AclBinding(kinds[res["type"]], res.get("name", "kafka-cluster"), pattern,
                                           f"User:{role}", "*", AclOperation[_OPERATIONS[operation]], AclPermissionType.ALLOW))
    client = admin(local_credentials(settings).kafka)
    for future in client.create_acls(bindings, request_timeout=30).values():
        try:
            future.result(30)
        except KafkaException as exc:
            raise ServiceError(f"could not create the Kafka ACLs: {exc.args[0].str()}") from None
    return len(bindings)
