"""Settings: flags over variables over defaults, clear errors, secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.environment import child_environment
from deploy.settings import load_settings, redact_url
from features.errors import ConfigError
from models.signing import SigningKey
from streams.kafka import KafkaConfig, parse_properties


def test_defaults(tmp_path):
    s = load_settings(environ={"EDDY_HOME": str(tmp_path)})
    assert s.kafka.bootstrap == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.lakehouse == str(tmp_path / "lakehouse")
    assert s.device == "auto" and s.engine == "native" and s.fused and s.guarantee == "" and s.partitions == 3
    assert s.pipeline.name == "fraud.yaml" and s.pipeline.exists()


@pytest.mark.parametrize(("environ", "fused"), [
    ({}, True),                                             # auto: the native engine, one scorer
    ({"EDDY_SCORERS": "3"}, False),                         # scorers apart from the engine: split
    ({"EDDY_ENGINE": "faust"}, False),                      # Faust and Flink run split
    ({"EDDY_STAGES": "split"}, False),
    ({"EDDY_STAGES": "fused", "EDDY_ENGINE_WORKERS": "2"}, True),
])
def test_auto_stages_are_fused_for_the_native_engine_with_one_scorer(tmp_path, environ, fused):
    s = load_settings(environ={"EDDY_HOME": str(tmp_path), **environ})
    assert s.fused is fused
    assert child_environment(s)["EDDY_STAGES"] == ("fused" if fused else "split")  # the stack's shape, resolved


def test_flag_wins_over_variable(tmp_path):
    env = {"EDDY_HOME": str(tmp_path), "EDDY_DEVICE": "cpu", "EDDY_KAFKA_BOOTSTRAP": "10.0.0.1:9092"}
    s = load_settings({"device": "cuda", "bootstrap": "127.0.0.1:1234"}, environ=env)
    assert s.device == "cuda" and s.kafka.bootstrap == "127.0.0.1:1234"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDDY_DEVICE": "tpu"}, "EDDY_DEVICE: 'tpu' is not one of auto, cpu, cuda"),
        ({"EDDY_KAFKA_BOOTSTRAP": "nohostport"}, "is not host:port"),
        ({"EDDY_REDIS_URL": "http://x"}, "is not a redis:// URL"),
        ({"EDDY_PARTITIONS": "zero"}, "is not a positive integer"),
        ({"EDDY_KAFKA_CONFIG": "/nonexistent.properties"}, "cannot read /nonexistent.properties"),
        ({"EDDY_REDIS_MAXMEMORY": "lots"}, "EDDY_REDIS_MAXMEMORY: 'lots' is not a size like 512mb or 2gb"),
        ({"EDDY_INSECURE": "maybe"}, "EDDY_INSECURE: 'maybe' is not on or off"),
        ({"EDDY_KAFKA_LISTEN": "19092"}, "EDDY_KAFKA_LISTEN: '19092' is not host:port, like 127.0.0.1:19092"),
        ({"EDDY_REDIS_LISTEN": "16379"}, "EDDY_REDIS_LISTEN: '16379' is not host:port, like 127.0.0.1:16379"),
    ],
)
def test_bad_values_name_the_fix(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(environ={"EDDY_HOME": str(tmp_path), **env})


def test_kafka_config_file_reaches_every_client_and_secrets_are_redacted(tmp_path):
    props = tmp_path / "client.properties"
    props.write_text(
        "# comment\nsecurity.protocol=SASL_SSL\nsasl.mechanism: PLAIN\n"
        "sasl.username=alice\nsasl.password=hunter2\nssl.key.password=s3cr3t\n"
    )
    s = load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_KAFKA_CONFIG": str(props),
                               "EDDY_REDIS_URL": "redis://:topsecret@cache:6379/0", "EDDY_MODEL_KEY": "ab" * 32})
    conf = s.kafka.client(**{"group.id": "g"})
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.password"] == "hunter2" and conf["group.id"] == "g"
    shown = repr(s) + str(s)
    for secret in ("hunter2", "s3cr3t", "topsecret", "ab" * 32):
        assert secret not in shown
    assert "sasl.username': 'alice'" in shown and "***" in shown
    assert s.signing_key().public_hex() == SigningKey.from_hex("ab" * 32).public_hex()


def test_model_key_generated_once_and_private(tmp_path):
    first = load_settings(environ={"EDDY_HOME": str(tmp_path)}).signing_key()
    second = load_settings(environ={"EDDY_HOME": str(tmp_path)}).signing_key()
    assert first.id == second.id and len((tmp_path / "model.key").read_text()) == 64
    assert (tmp_path / "model.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "model.key").chmod(0o644)  # readable by others: refused, in one line that says the fix
    with pytest.raises(ConfigError, match="mode 0600.*chmod 600"):
        load_settings(environ={"EDDY_HOME": str(tmp_path)}).signing_key()


def test_model_keys_are_checked_and_trust_is_public_keys_only(tmp_path):
    with pytest.raises(ConfigError, match="64 hex characters"):
        load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_MODEL_KEY": "short"})
    with pytest.raises(ConfigError, match="EDDY_MODEL_TRUST"):
        load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_MODEL_TRUST": "not-a-key"})
    old, new = SigningKey.from_hex("01" * 32), SigningKey.from_hex("02" * 32)
    trust = ",".join(old.public_hex() + new.public_hex())  # a rotation: both trusted while the old retires
    s = load_settings(environ={"EDDY_HOME": str(tmp_path), "EDDY_MODEL_TRUST": trust})
    trusted = s.trusted_keys()
    assert not isinstance(trusted, SigningKey) and set(trusted.keys) == {old.id, new.id}
    assert not (tmp_path / "model.key").exists()  # trusting needs no private key, so none was made


def test_properties_parse_errors_name_the_line():
    with pytest.raises(ConfigError, match="f.properties:2: expected 'key=value'"):
        parse_properties("a=1\njunk\n", "f.properties")


def test_redact_url_and_kafka_repr():
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert "pw" not in repr(KafkaConfig("h:1", {"sasl.jaas.config": "pw"}))


def test_child_environment_binds_loopback_only_for_a_local_spark_and_logs_flink_beside_its_data(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    monkeypatch.delenv("FLINK_LOG_DIR", raising=False)
    local = child_environment(load_settings({"engine": "flink"}, environ={"EDDY_HOME": str(tmp_path)}))
    assert local["SPARK_LOCAL_IP"] == "127.0.0.1" and local["EDDY_ENGINE"] == "flink"
    assert local["FLINK_LOG_DIR"] == str(tmp_path / "engines" / "flink" / "log")
    cluster = child_environment(load_settings(environ={"EDDY_HOME": str(tmp_path),
                                                       "EDDY_SPARK_MASTER": "spark://10.0.0.5:7077"}))
    assert "SPARK_LOCAL_IP" not in cluster and "FLINK_LOG_DIR" not in cluster
    assert cluster["EDDY_SPARK_MASTER"] == "spark://10.0.0.5:7077"


def test_alert_for_shortens_only_longer_holds_in_copies_of_the_rules(tmp_path):
    import yaml

    from deploy.prometheus_local import RULES_DIR, rule_files

    plain = load_settings(environ={"EDDY_HOME": str(tmp_path / "a")})
    assert rule_files(plain, tmp_path / "a") == [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
    short = load_settings(environ={"EDDY_HOME": str(tmp_path / "b"), "EDDY_ALERT_FOR": "10s"})
    copies = rule_files(short, tmp_path / "b")
    assert [p.rsplit("/", 1)[1] for p in copies] == [p.name for p in sorted(RULES_DIR.glob("*.yml"))]
    holds = {}
    for original, copy in zip(sorted(RULES_DIR.glob("*.yml")), copies, strict=True):
        before, after = (yaml.safe_load(t) for t in (original.read_text(), Path(copy).read_text()))
        for g0, g1 in zip(before["groups"], after["groups"], strict=True):
            for r0, r1 in zip(g0["rules"], g1["rules"], strict=True):
                assert {k: v for k, v in r0.items() if k != "for"} == {k: v for k, v in r1.items() if k != "for"}
                if "alert" in r0:
                    holds[r0["alert"]] = (r0.get("for"), r1.get("for"))
    assert holds["EddyFeatureDrift"] == ("15m", "10s")
    assert all(after in ("10s", before) for before, after in holds.values())
    assert any(before == after for before, after in holds.values())  # 0m holds stay as they were


def test_unsafe_kafka_client_settings_are_refused_in_one_line(tmp_path):
    props = tmp_path / "client.properties"
    props.write_text("security.protocol=SSL\nenable.ssl.certificate.verification=false\n")
    env = {"EDDY_HOME": str(tmp_path), "EDDY_KAFKA_CONFIG": str(props)}
    with pytest.raises(ConfigError, match="trusts any broker certificate.*EDDY_KAFKA_UNVERIFIED_TLS=on"):
        load_settings(environ=env)
    allowed = load_settings(environ={**env, "EDDY_KAFKA_UNVERIFIED_TLS": "on"})
    assert allowed.kafka.properties["enable.ssl.certificate.verification"] == "false"
    for mechanism in ("sasl.mechanism", "sasl.mechanisms"):
        props.write_text(f"security.protocol=SASL_PLAINTEXT\n{mechanism}=PLAIN\nsasl.username=u\nsasl.password=p\n")
        with pytest.raises(ConfigError, match="password in clear"):
            load_settings(environ=env)
    props.write_text("security.protocol=SASL_SSL\nsasl.mechanisms=PLAIN\nssl.key.pem=PRIVATE\nssl.keystore.key=K2\n")
    shown = repr(load_settings(environ=env))
    assert "PRIVATE" not in shown and "K2" not in shown


def test_the_guarantee_comes_from_the_spec_unless_set_and_needs_the_native_engine(tmp_path):
    import pytest

    from features.errors import ConfigError

    env = {"EDDY_HOME": str(tmp_path)}
    assert load_settings(environ=env).pipeline_spec().guarantee == "exactly_once"
    spec = load_settings(environ={**env, "EDDY_GUARANTEE": "AT_LEAST_ONCE"}).pipeline_spec()
    assert spec.guarantee == "at_least_once"
    assert spec.spec_hash == load_settings(environ=env).pipeline_spec().spec_hash  # models stay valid
    with pytest.raises(ConfigError, match="at_least_once guarantee runs with the native engine"):
        load_settings(environ={**env, "EDDY_GUARANTEE": "at_least_once", "EDDY_ENGINE": "faust"}).pipeline_spec()
    with pytest.raises(ConfigError, match="EDDY_GUARANTEE: 'sometimes' is not exactly_once or at_least_once"):
        load_settings(environ={**env, "EDDY_GUARANTEE": "sometimes"})


def test_a_listen_address_is_a_loopback_port_other_than_the_clients_one():
    from deploy.processes import listen_address

    assert listen_address("EDDY_REDIS_LISTEN", "", "127.0.0.1", 6379, "x") == ("127.0.0.1", 6379)
    assert listen_address("EDDY_REDIS_LISTEN", "127.0.0.1:16379", "127.0.0.1", 6379, "x") == ("127.0.0.1", 16379)
    for listen in ("10.0.0.5:16379", "127.0.0.1:6379"):
        with pytest.raises(ConfigError, match=f"EDDY_REDIS_LISTEN '{listen}': the local service binds a loopback "
                                              r"host:port other than the one clients use \(127.0.0.1:6379\), like x"):
            listen_address("EDDY_REDIS_LISTEN", listen, "127.0.0.1", 6379, "x")
