"""The local stack on real services: the broker carries records in order, up/down/status tell the truth."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from streams.kafka import KafkaConfig, admin
from tests.conftest import run_eddy, stack_environment
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.kafka


def test_10k_records_all_come_back_in_per_key_order(settings, fresh_topic):
    from confluent_kafka import Consumer, Producer

    producer = Producer(settings.kafka.client(**{"linger.ms": 5, "enable.idempotence": True}))
    keys = [f"k-{i}" for i in range(37)]
    for n in range(10_000):
        key = keys[n % len(keys)]
        producer.produce(fresh_topic, key=key.encode(), value=f"{key}:{n}".encode())
        if n % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    consumer = Consumer(settings.kafka.client(**{
        "group.id": f"g-{fresh_topic}", "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([fresh_topic])
    seen: dict[str, list[int]] = {}
    total = 0

    def all_read() -> bool:
        nonlocal total
        for msg in consumer.consume(num_messages=1000, timeout=1.0):
            assert msg.error() is None
            key, _, n = msg.value().decode().partition(":")
            assert msg.key().decode() == key
            seen.setdefault(key, []).append(int(n))
            total += 1
        return total >= 10_000

    try:
        wait_for(all_read, 60, "the 10,000 records", every_s=0)
    finally:
        consumer.close()

    assert total == 10_000
    assert sorted(seen) == sorted(keys)
    for key, numbers in seen.items():
        assert numbers == sorted(numbers), f"order broken for {key}"
        assert len(numbers) == len(range(keys.index(key), 10_000, len(keys)))


def test_spec_topics_exist_with_configured_partitions(settings):
    from features.spec import load_spec
    from streams.kafka import admin

    spec = load_spec(settings.pipeline)
    topics = admin(settings.kafka).list_topics(timeout=10).topics
    for name in spec.topics.all():
        assert name in topics
    assert len(topics[spec.topics.source].partitions) == settings.partitions
    assert len(topics[spec.topics.model_updates].partitions) == 1
    from confluent_kafka.admin import ConfigResource

    resource = ConfigResource(ConfigResource.Type.TOPIC, spec.topics.model_updates)
    client = admin(settings.kafka)  # held: a client destroyed mid-request fails its futures
    configs = next(iter(client.describe_configs([resource]).values())).result(10)
    assert configs["retention.ms"].value == "-1"  # a scorer started after a week still finds its model


def test_up_twice_status_and_down_on_a_private_stack(tmp_path):
    env = {**stack_environment(tmp_path / "home"), "EDDY_STAGES": "split"}  # the stages apart, each as its role
    try:
        first = run_eddy(["up"], env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.count("started in") >= 3  # broker, redis and the feature engine at least
        before = json.loads(run_eddy(["status", "--json"], env).stdout)
        parts = before["parts"]
        assert {"broker", "redis", "features-native"} <= set(parts)
        for name, part in parts.items():
            assert part["state"] == "up", (name, part)
            assert part["managed"] is True and part["pid"] and part["rss_mb"] > 0
            assert Path(part["log"]).exists()
        assert parts["features-native"]["replicas"] == 1 and parts["features-native"]["engine"] == "native"
        # Only what publishes models holds the private key: these get the public key to trust instead.
        from models.signing import SigningKey

        trusted = SigningKey.from_hex(env["EDDY_MODEL_KEY"]).public_hex()[0]
        for name in ("scorer-0", "features-native", "online-writer"):
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{parts[name]['pid']}/environ").read_text().split("\0")
                           if "=" in v)
            assert "EDDY_MODEL_KEY" not in environ and environ["EDDY_MODEL_TRUST"] == trusted, name
        # Each stage signs in to the secure broker and Redis as its own role, never as the admin.
        assert parts["broker"]["security"] == "SASL_SSL" and parts["redis"]["users"] is True
        for name, role in {"scorer-0": "scorer", "features-native": "features", "online-writer": "online-writer"}.items():
            assert (parts[name]["principal"], parts[name]["tls"]) == (f"User:{role}", True), name
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{parts[name]['pid']}/environ").read_text().split("\0")
                           if "=" in v)
            assert environ["EDDY_KAFKA_CONFIG"].endswith(f"/secrets/kafka/{role}.properties"), name
            assert environ["EDDY_REDIS_URL"].startswith(f"redis://{role}:"), name

        again = run_eddy(["up"], env)
        assert again.returncode == 0, again.stderr
        assert "started in" not in again.stdout and again.stdout.count("running") == len(parts)
        after = json.loads(run_eddy(["status", "--json"], env).stdout)
        assert {n: p["pid"] for n, p in after["parts"].items()} == {n: p["pid"] for n, p in parts.items()}

        down = run_eddy(["down"], env)
        assert down.returncode == 0, down.stderr
        assert set(down.stdout.removeprefix("stopped: ").strip().split(", ")) == set(parts)
        for part in parts.values():
            pid = part["pid"]
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        for address in (env["EDDY_KAFKA_BOOTSTRAP"], env["EDDY_REDIS_URL"].split("//")[1].split("/")[0]):
            host, port = address.rsplit(":", 1)
            with socket.socket() as sock:
                # raises if anything still listens there (connections closed a moment ago may linger)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
        status = json.loads(run_eddy(["status", "--json"], env).stdout)
        assert status["parts"]["broker"]["state"] == "down"
        assert status["parts"]["redis"]["state"] == "down"
        assert run_eddy(["down"], env).stdout.strip() == "nothing was running"
    finally:
        run_eddy(["down"], env)  # whatever failed, nothing is left running


def test_insecure_stack_is_plaintext_and_not_switched_while_running(tmp_path):
    env = {**stack_environment(tmp_path / "home"), "EDDY_STAGES": "fused"}
    try:
        up = run_eddy(["up", "--insecure"], env)
        assert up.returncode == 0, up.stderr
        parts = json.loads(run_eddy(["status", "--json"], env).stdout)["parts"]
        assert parts["broker"]["security"] == "PLAINTEXT" and parts["redis"]["users"] is False
        assert set(parts) >= {"features-fused"} and not {"online-writer", "scorer-0", "features-native"} & set(parts)
        assert parts["features-fused"]["principal"] == "User:ANONYMOUS" and parts["features-fused"]["tls"] is False
        # any client gets in: that is what --insecure means
        assert admin(KafkaConfig(env["EDDY_KAFKA_BOOTSTRAP"])).list_topics(timeout=10).topics
        assert not list((tmp_path / "home" / "secrets" / "kafka").glob("*.properties"))
        switch = run_eddy(["up"], env)
        assert switch.returncode == 1
        assert switch.stderr.strip() == ("eddy: error: the local broker runs plaintext (--insecure): "
                                         "`eddy down` first to start it secure")
        assert run_eddy(["credentials", "producer"], env).returncode == 1
    finally:
        run_eddy(["down"], env)


def test_foreign_listener_on_the_broker_port_gives_one_clear_line(tmp_path):
    env = stack_environment(tmp_path / "home")
    host, port = env["EDDY_KAFKA_BOOTSTRAP"].rsplit(":", 1)
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        result = run_eddy(["up"], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{host}:{port} is held by pid" in lines[0]
    assert "does not answer as a Kafka broker" in lines[0] and "EDDY_KAFKA_BOOTSTRAP" in lines[0]


def test_missing_java_gives_one_clear_line(tmp_path):
    env = stack_environment(tmp_path / "home")
    env["PATH"] = "/nonexistent"
    result = run_eddy(["up"], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("eddy: error: Java 17+ is needed")


def test_broker_that_dies_at_start_names_the_cause_and_the_log(tmp_path):
    env = stack_environment(tmp_path / "home")
    data = Path(env["EDDY_HOME"]) / "kafka" / "data"
    data.mkdir(parents=True)
    # Storage formatted for another node: the broker refuses to start on it.
    (data / "meta.properties").write_text("version=1\nnode.id=7\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\ndirectory.id=AAAAAAAAAAAAAAAAAAAAAA\n")
    result = run_eddy(["up"], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "the Kafka broker exited during start" in line
    assert str(Path(env["EDDY_HOME"]) / "logs" / "broker.log") in line
    run_eddy(["down"], env)
