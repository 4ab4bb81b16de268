"""The Flink job's configuration and the Java client's settings, with no Flink job running."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"


def test_client_settings_are_translated_for_the_java_client(tmp_path):
    from streams.kafka import KafkaConfig, java_client_properties

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("CERT")
    key.write_text("KEY")
    props = java_client_properties(KafkaConfig("h:9093", {
        "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512", "sasl.username": "u",
        "sasl.password": 'p"w', "ssl.ca.location": "/ca.pem", "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key), "enable.ssl.certificate.verification": "false"}))
    assert props == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.jaas.config": 'org.apache.kafka.common.security.scram.ScramLoginModule required '
                            'username="u" password="p\\"w";',
        "ssl.truststore.type": "PEM", "ssl.truststore.location": "/ca.pem",
        "ssl.keystore.type": "PEM", "ssl.keystore.certificate.chain": "CERT", "ssl.keystore.key": "KEY",
        "ssl.endpoint.identification.algorithm": ""}


def test_a_run_restores_the_newest_complete_checkpoint_of_its_own_mode(tmp_path):
    from features.spec import load_spec
    from streams.engines.config import EngineConfig
    from streams.engines.flink_job import checkpoint_dir, flink_configuration
    from streams.kafka import KafkaConfig

    config = EngineConfig(KafkaConfig("h:1"), load_spec(PIPELINES / "fraud.yaml"), "redis://h:1/0",
                          tmp_path, partitions=3, jars_dir=REPO / ".jars")
    assert "execution.state-recovery.path" not in flink_configuration(config)
    root = checkpoint_dir(config)
    for when, (run, chk, complete) in enumerate([("old", 7, True), ("new", 3, True), ("new", 4, False),
                                                 ("dead", 9, False)]):
        (root / run / f"chk-{chk}").mkdir(parents=True)
        if complete:
            (root / run / f"chk-{chk}" / "_metadata").write_bytes(b"")
            os.utime(root / run / f"chk-{chk}" / "_metadata", (1_000 + when, 1_000 + when))
    conf = flink_configuration(config)
    assert conf["execution.state-recovery.path"] == (root / "new" / "chk-3").as_uri()
    assert sorted(p.name for p in root.iterdir()) == ["new"]  # the other runs' leftovers are gone
    assert "execution.state-recovery.path" not in flink_configuration(replace(config, bounded=True))
