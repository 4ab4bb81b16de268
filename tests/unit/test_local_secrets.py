"""The local stack's secrets as files: the certificates, the roles' client files and who reads which
(deploy.security), and each role's Redis rules (deploy.access). The services' side is in
tests/integration/test_security.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509

from deploy import security
from deploy.access import ROLES, redis_acls
from features.spec import load_spec
from streams.kafka import KafkaConfig, java_client_properties

REPO = Path(__file__).resolve().parents[2]


def test_certificates_are_made_once_private_and_name_the_hosts(tmp_path: Path) -> None:
    pki = security.ensure_pki(tmp_path, ["127.0.0.2"])
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=broker"  # the broker's principal, by the mapping rule
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.2") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    for path in security.secrets_dir(tmp_path).iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert security.secrets_dir(tmp_path).stat().st_mode & 0o777 == 0o700
    before = pki.server_cert.read_bytes()
    assert security.ensure_pki(tmp_path, ["127.0.0.2"]).server_cert.read_bytes() == before  # kept
    security.ensure_pki(tmp_path, ["127.0.0.3"])  # a host it does not name: made again
    assert pki.server_cert.read_bytes() != before


def test_role_files_sign_in_only_to_the_broker_they_were_written_for(tmp_path: Path) -> None:
    pki = security.ensure_pki(tmp_path, [])
    security.write_kafka_clients(tmp_path, "127.0.0.1:9092", ROLES, pki.ca)
    scorer = security.local_kafka_properties(tmp_path, "127.0.0.1:9092", "scorer")
    assert scorer is not None
    assert (scorer["security.protocol"], scorer["sasl.mechanisms"], scorer["sasl.username"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "scorer")
    assert scorer["sasl.password"] == security.passwords(tmp_path, ROLES)["scorer"]
    assert security.local_kafka_properties(tmp_path, "127.0.0.1:9093") is None  # another broker: no credentials
    assert len(set(security.passwords(tmp_path, ROLES).values())) == len(ROLES)


def test_outside_roles_get_client_certificates(tmp_path: Path) -> None:
    security.ensure_pki(tmp_path, [])
    security.write_outside_clients(tmp_path, "127.0.0.1:9094")
    props = dict(line.split("=", 1) for line in security.clients_file(tmp_path, "reader").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    assert props["security.protocol"] == "SSL" and props["isolation.level"] == "read_committed"
    cert = x509.load_pem_x509_certificate(Path(props["ssl.certificate.location"]).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=reader"


def test_redis_urls_carry_the_role_and_quote_its_password() -> None:
    url = security.role_redis_url("redis://127.0.0.1:6390/0", "scorer", "p@ss/word", None)
    parts = urlsplit(url)
    assert (parts.scheme, parts.username, parts.port) == ("redis", "scorer", 6390)
    assert "p%40ss%2Fword" in url
    tls = urlsplit(security.role_redis_url("redis://127.0.0.1:6390/0", "admin", "x", Path("/ca.pem")))
    assert tls.scheme == "rediss" and parse_qs(tls.query) == {"ssl_ca_certs": ["/ca.pem"]}


def test_redis_rules_give_scripts_to_the_engines_only_and_nothing_dangerous_but_to_admin() -> None:
    rules = redis_acls(load_spec(REPO / "pipelines" / "fraud.yaml"))
    assert set(rules) == set(ROLES)
    for role, text in rules.items():
        if role == "admin":
            continue
        assert "-@dangerous" in text or text.endswith("-@all"), role
        assert ("+@scripting" in text) == (role in ("features", "fused")), role
        assert "~*" not in text.split(), role
    assert "%R~*fraud" in rules["scorer"] and "~eddy:fraud:hist:*" in rules["scorer"]
    # the only writers of Feast's keys: the online writer, and the fused stage that does its work
    assert {role for role, text in rules.items() if "~*fraud" in text.split()} == {"online-writer", "fused"}


def test_the_flink_connector_gets_its_relocated_login_module() -> None:
    kafka = KafkaConfig("127.0.0.1:9092", {"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                                           "sasl.username": "features", "sasl.password": 'a"b',
                                           "ssl.ca.location": "/ca.pem", "isolation.level": "read_committed"})
    props = java_client_properties(kafka, shaded="org.apache.flink.kafka.shaded.")
    assert props["sasl.jaas.config"] == ('org.apache.flink.kafka.shaded.org.apache.kafka.common.security.scram.'
                                         'ScramLoginModule required username="features" password="a\\"b";')
    assert props["ssl.truststore.type"] == "PEM" and "isolation.level" not in props
