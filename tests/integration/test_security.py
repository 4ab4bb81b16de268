"""The secure default, on the session's local stack (real broker, real redis-server): who gets in,
what each role may do, and people's own tools (kcat) with `eddy credentials`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from deploy.security import kafka_client_file, redis_url_file
from features.spec import load_spec
from streams.kafka import parse_properties
from tests.conftest import REPO, run_eddy

pytestmark = [pytest.mark.kafka, pytest.mark.redis]
SPEC = load_spec(REPO / "pipelines" / "fraud.yaml")


def role_props(home: Path, role: str) -> dict[str, str]:
    """The librdkafka settings eddy's processes of `role` connect with."""
    return parse_properties(kafka_client_file(home, role).read_text())


def home_of(stack_env: dict[str, str]) -> Path:
    return Path(stack_env["EDDY_HOME"])


def connect_errors(props: dict[str, str]) -> list[KafkaError]:
    """The errors a client with `props` meets asking the broker for its topics; [] when it gets in."""
    errors: list[KafkaError] = []
    client = Producer({**props, "error_cb": errors.append, "socket.timeout.ms": 3000})
    try:
        client.list_topics(timeout=6)
        return []
    except KafkaException as exc:
        client.poll(1)  # serves the error callbacks: why the connection failed
        return [*errors, exc.args[0]]


def test_the_broker_refuses_anonymous_wrong_password_and_plaintext_clients(stack_env) -> None:
    home = home_of(stack_env)
    admin = role_props(home, "admin")
    bootstrap = admin["bootstrap.servers"]

    assert connect_errors(admin) == []  # the admin gets in: the refusals below are about credentials
    wrong = connect_errors({**admin, "sasl.password": "not-the-password"})
    assert any(e.code() == KafkaError._AUTHENTICATION for e in wrong), wrong
    # TLS without SASL (anonymous) and plaintext both fail before any request is served
    anonymous = {"bootstrap.servers": bootstrap, "security.protocol": "SSL", "ssl.ca.location": admin["ssl.ca.location"]}
    assert connect_errors(anonymous)
    assert connect_errors({"bootstrap.servers": bootstrap})
    # a client that does not trust the stack's CA never sends its password
    untrusted = connect_errors({**admin, "ssl.ca.location": "probe"})
    assert untrusted and not any(e.code() == KafkaError._AUTHENTICATION for e in untrusted)


def test_only_the_publisher_writes_model_updates(stack_env) -> None:
    home = home_of(stack_env)
    topic = SPEC.topics.model_updates
    outcomes = {}
    for role in ("scorer", "features", "producer", "publisher"):
        results: list[KafkaError | None] = []
        producer = Producer({**role_props(home, role), "message.timeout.ms": 8000})
        producer.produce(topic, b"{}", on_delivery=lambda err, _msg, out=results: out.append(err))
        producer.flush(15)
        outcomes[role] = results[0].code() if results and results[0] is not None else None
    assert outcomes == {"scorer": KafkaError.TOPIC_AUTHORIZATION_FAILED,
                        "features": KafkaError.TOPIC_AUTHORIZATION_FAILED,
                        "producer": KafkaError.TOPIC_AUTHORIZATION_FAILED,
                        "publisher": None}


def read_errors(props: dict[str, str], topic: str, group: str) -> set[int] | None:
    """The error codes a consumer with `props` meets reading `topic` from the start (under `group`,
    which it may use, so the topic's ACL decides); None when it reads a record."""
    consumer = Consumer({**props, "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    codes: set[int] = set()
    try:
        for _ in range(16):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return None
            if msg is not None and msg.error().code() != KafkaError._PARTITION_EOF:
                codes.add(msg.error().code())
        return codes
    finally:
        consumer.close()


def test_each_role_reads_only_its_topics(stack_env) -> None:
    home = home_of(stack_env)
    t = SPEC.topics
    # something to read, written by the producer role
    producer = Producer(role_props(home, "producer"))
    producer.produce(t.source, b'{"probe": 1}', partition=0)
    assert producer.flush(15) == 0
    # the producer may not even see that predictions exists, and may not read it under any group
    metadata = Producer(role_props(home, "producer")).list_topics(t.predictions, timeout=10)
    assert metadata.topics[t.predictions].error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert read_errors(role_props(home, "producer"), t.predictions, "eddy-consume-x") == {
        KafkaError.GROUP_AUTHORIZATION_FAILED}
    writer_group = SPEC.stage_id("online-writer")
    assert read_errors(role_props(home, "online-writer"), t.source, writer_group) == {
        KafkaError.TOPIC_AUTHORIZATION_FAILED}
    assert read_errors(role_props(home, "reader"), t.source, f"eddy-consume-{uuid.uuid4().hex[:8]}") is None


def test_redis_users_hold_only_their_keys(stack_env) -> None:
    home = home_of(stack_env)
    parts = urlsplit(stack_env["EDDY_REDIS_URL"])  # the admin's
    bare = redis.Redis(host=parts.hostname, port=parts.port)
    with pytest.raises(redis.AuthenticationError):
        bare.set("eddy:probe", 1)

    def user(role: str) -> redis.Redis:
        return redis.Redis.from_url(redis_url_file(home, role).read_text().strip())

    admin = user("admin")
    feast_key = b"\x02\x00\x00\x00card_id" + b"fraud"  # Feast's keys end with the project's name
    admin.hset(feast_key, "f", b"1")
    scorer = user("scorer")
    assert scorer.hget(feast_key, "f") == b"1"  # reads the online features
    for refused in (lambda: scorer.hset(feast_key, "f", b"2"), lambda: scorer.flushall(),
                    lambda: scorer.config_set("maxmemory", "1"), lambda: scorer.keys("*"),
                    lambda: scorer.set(f"eddy:{SPEC.name}:seen:probe", 1),
                    lambda: scorer.eval("return 1", 0)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    scorer.rpush(f"eddy:{SPEC.name}:hist:probe", b"x")  # its own history keys
    features = user("features")
    assert features.set(f"eddy:{SPEC.name}:seen:probe", 1)
    assert features.eval("return 1", 0) == 1  # the dedupe script's role may run scripts
    with pytest.raises(redis.exceptions.NoPermissionError):
        features.hset(feast_key, "f", b"3")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user("online-writer").get(f"eddy:{SPEC.name}:seen:probe")
    assert admin.hget(feast_key, "f") == b"1"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by make setup")
def test_kcat_produces_and_reads_with_eddy_credentials(stack_env) -> None:
    paths = {}
    for role in ("producer", "reader"):
        done = run_eddy(["credentials", role], stack_env, timeout=60)
        assert done.returncode == 0, done.stderr
        paths[role] = done.stdout.strip()
        assert Path(paths[role]).stat().st_mode & 0o777 == 0o600
    topic = SPEC.topics.labels
    marker = uuid.uuid4().hex
    lines = "".join(f"k{i}:{{\"probe\": \"{marker}\", \"i\": {i}}}\n" for i in range(5))
    sent = subprocess.run(["kcat", "-F", paths["producer"], "-P", "-t", topic, "-K:"], input=lines, text=True,
                          capture_output=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    read = subprocess.run(["kcat", "-F", paths["reader"], "-C", "-t", topic, "-e", "-q", "-f", "%k %s\n"],
                          text=True, capture_output=True, timeout=60)
    assert read.returncode == 0, read.stderr
    mine = [line for line in read.stdout.splitlines() if marker in line]
    assert sorted(line.split()[0] for line in mine) == [f"k{i}" for i in range(5)]
    # the producer may not write model-updates, nor read predictions
    refused = subprocess.run(["kcat", "-F", paths["producer"], "-P", "-t", SPEC.topics.model_updates],
                             input="x\n", text=True, capture_output=True, timeout=60)
    assert refused.returncode != 0 and "authoriz" in refused.stderr.lower(), refused.stderr


def test_credentials_names_the_roles_it_knows(stack_env) -> None:
    done = run_eddy(["credentials", "root"], stack_env, timeout=60)
    assert done.returncode == 2  # a bad argument, as for any bad flag
    assert done.stderr.strip() == "eddy: error: no role 'root': use one of producer, reader, admin"


def test_eddy_on_a_secure_cluster_of_ones_own(settings, stack_env, tmp_path) -> None:
    """As docs/clusters.md shows for existing clusters: EDDY_KAFKA_CONFIG with SCRAM over TLS, and a
    Redis that speaks TLS only with ACL users (rediss:// with its CA), used by a process of another home."""
    from deploy import redis_local, stack
    from deploy.settings import load_settings, local_credentials
    from streams.engines.config import STAGE
    from streams.metrics import read_metrics
    from tests.conftest import stack_environment
    from tests.integration.test_flink_engine import PIPELINES
    from tests.parity import check_engine_output, parity_case
    from tests.stack_helpers import wait_for

    tls = load_settings(environ={**stack_environment(tmp_path / "redis-home"), "EDDY_REDIS_TLS": "on"})
    try:
        redis_local.ensure_redis(tls, stack.process_table(tls))
        url = local_credentials(tls).redis_url
        parts = urlsplit(url)
        assert parts.scheme == "rediss" and parts.username == "admin"
        with pytest.raises(redis.ConnectionError):  # plaintext to a TLS-only port
            redis.Redis(host=parts.hostname, port=parts.port, socket_timeout=3).ping()
        with pytest.raises(redis.AuthenticationError):  # TLS, but no user
            redis.Redis.from_url(f"rediss://{parts.hostname}:{parts.port}/0?{parts.query}").set("eddy:probe", 1)

        case = parity_case(settings, PIPELINES / "fraud.yaml", tmp_path / "case")
        env = {**os.environ, "EDDY_HOME": str(tmp_path / "home"), "EDDY_PIPELINE": str(case.spec_path),
               "EDDY_KAFKA_BOOTSTRAP": stack_env["EDDY_KAFKA_BOOTSTRAP"],
               "EDDY_KAFKA_CONFIG": stack_env["EDDY_KAFKA_CONFIG"], "EDDY_REDIS_URL": url}
        worker = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", "features-native"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(url)
        try:
            wait_for(lambda: any(b["valid"] + b["dlq"] + b["duplicates"] == len(case.stream)
                                 for b in read_metrics(client, case.spec.name, STAGE)), 180,
                     "the engine to see every record")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        check_engine_output(settings, case.spec, case.expected, case.delivered, case.invalid)
        assert client.exists(f"eddy:{case.spec.name}:seen:{next(iter(case.expected))}")  # dedupe over TLS
    finally:
        stack.down(tls)
