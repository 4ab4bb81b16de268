"""The local stack's secrets, made once under EDDY_HOME/secrets (a 0700 folder, files 0600): a CA and
the servers' certificate, one password per role (deploy.access.ROLES), and the client files each
role's processes read: a librdkafka properties file (`eddy credentials ROLE`) and a Redis URL.

The broker's own identity is its certificate (CN=broker): it authenticates the broker to itself on the
internal and controller listeners, and eddy uses it once per start to create the roles' SCRAM
credentials and ACLs over the internal listener, so no password is ever put on a command line."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from features.errors import ConfigError

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
BROKER_PRINCIPAL = "broker"
ADMIN = "admin"
_CA_DAYS = 3650
_CERT_DAYS = 825


def secrets_dir(home: Path) -> Path:
    return home / "secrets"


def kafka_client_file(home: Path, role: str) -> Path:
    """The librdkafka properties file of `role` (written while the local broker is secure)."""
    return secrets_dir(home) / "kafka" / f"{role}.properties"


def redis_url_file(home: Path, role: str) -> Path:
    """The Redis URL of `role`, with its password (written while the local Redis has ACL users)."""
    return secrets_dir(home) / "redis" / f"{role}.url"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: str | bytes) -> Path:
    """Write `data` to a file only its owner can read (created 0600, replaced atomically)."""
    _private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    temporary.replace(path)
    return path


def forget_clients(home: Path, service: str) -> None:
    """Remove the roles' client files of `service` ("kafka" or "redis": it now runs --insecure); the
    passwords and the CA stay."""
    for path in (secrets_dir(home) / service).glob("*"):
        path.unlink(missing_ok=True)


# --- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path           # the CA certificate clients trust
    server_pem: Path   # the servers' key and certificate in one file (Kafka's PEM key store)
    server_cert: Path  # the same certificate alone (redis-server)
    server_key: Path   # the same key alone (redis-server)


def ensure_pki(home: Path, hosts: Iterable[str]) -> Pki:
    """The CA and the servers' certificate (CN=broker), made once; the certificate is made again when it
    does not name one of `hosts` (as an IP or DNS subject alternative name) or is near its end."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = _private_dir(secrets_dir(home))
    pki = Pki(root / "ca.pem", root / "server.pem", root / "server.crt", root / "server.key")
    ca_key_path = root / "ca.key"
    if not ca_key_path.exists() or not pki.ca.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "eddy local CA")])
        cert = (_builder(name, name, key.public_key(), _CA_DAYS)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .sign(key, _sha256()))
        write_private(ca_key_path, _pkcs8(key))
        write_private(pki.ca, cert.public_bytes(serialization.Encoding.PEM))
        pki.server_cert.unlink(missing_ok=True)  # signed by the CA that is gone
    wanted = {"localhost", "127.0.0.1", "::1", *hosts}
    if _current(pki.server_cert, wanted):
        return pki
    names: list[x509.GeneralName] = []
    for host in sorted(wanted):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key_pem, cert_pem = _issue(root, BROKER_PRINCIPAL, x509.SubjectAlternativeName(names))
    write_private(pki.server_key, key_pem)
    write_private(pki.server_cert, cert_pem)
    write_private(pki.server_pem, key_pem + cert_pem)
    return pki


def _issue(root: Path, common_name: str, names: Any = None) -> tuple[bytes, bytes]:
    """A new key and a certificate for it, CN=common_name (a Kafka principal, by the broker's mapping
    rule), signed by the CA under root; (key PEM in PKCS#8, certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]), ca_cert.subject,
                        key.public_key(), _CERT_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH,
                                                     x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names is not None:
        builder = builder.add_extension(names, critical=False)
    cert = builder.sign(ca_key, _sha256())
    return _pkcs8(key), cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: Any, issuer: Any, public_key: Any, days: int) -> Any:
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _pkcs8(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _current(cert_path: Path, hosts: set[str]) -> bool:
    """Whether the certificate at cert_path names every host and has a month left."""
    from cryptography import x509

    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=30):
        return False
    if not hosts:
        return True
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    named = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))
    return {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts} <= named


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# --- passwords and client files ------------------------------------------------------------------------


def passwords(home: Path, roles: Iterable[str]) -> dict[str, str]:
    """Each role's password, made once (secrets/passwords.json) and kept across restarts."""
    path = secrets_dir(home) / "passwords.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [r for r in roles if r not in known]
    if missing:
        known.update({r: secrets.token_urlsafe(24) for r in missing})
        write_private(path, json.dumps(known, indent=1))
    return known


def kafka_client_properties(bootstrap: str, role: str, password: str, ca: Path) -> dict[str, str]:
    """The librdkafka settings `role` connects with to the local secure broker."""
    props = {"bootstrap.servers": bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanisms": SCRAM_MECHANISM,
             "sasl.username": role, "sasl.password": password, "ssl.ca.location": str(ca)}
    if role == "reader":
        props["isolation.level"] = "read_committed"  # a reader sees committed records only
    return props


def write_kafka_clients(home: Path, bootstrap: str, roles: Iterable[str], ca: Path) -> None:
    """Write each role's librdkafka properties file (what `eddy credentials ROLE` names)."""
    known = passwords(home, roles)
    for role in roles:
        props = kafka_client_properties(bootstrap, role, known[role], ca)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        write_private(kafka_client_file(home, role), f"# eddy's local broker, principal User:{role}\n{text}")


# The roles people's own tools sign in as (`eddy credentials ROLE`). They use client certificates on the
# broker's mTLS listener: any librdkafka speaks TLS, while SCRAM against Kafka 4 needs librdkafka 2.6.1+
# (older ones repeat the client nonce, which Kafka 4 refuses), and Debian's kcat links 2.0.2.
OUTSIDE_ROLES = ("producer", "reader", ADMIN)


def clients_file(home: Path, role: str) -> Path:
    """The librdkafka properties file `eddy credentials ROLE` prints."""
    return secrets_dir(home) / "clients" / f"{role}.properties"


def write_outside_clients(home: Path, bootstrap: str) -> None:
    """A client certificate (CN=ROLE) and a librdkafka properties file for each outside role, against the
    broker's mTLS listener at `bootstrap`."""
    root = secrets_dir(home)
    for role in OUTSIDE_ROLES:
        key, cert = clients_file(home, role).with_suffix(".key"), clients_file(home, role).with_suffix(".crt")
        if not key.exists() or not _current(cert, set()):
            key_pem, cert_pem = _issue(root, role)
            write_private(key, key_pem)
            write_private(cert, cert_pem)
        props = {"bootstrap.servers": bootstrap, "security.protocol": "SSL", "ssl.ca.location": str(root / "ca.pem"),
                 "ssl.certificate.location": str(cert), "ssl.key.location": str(key)}
        if role == "reader":
            props["isolation.level"] = "read_committed"
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        write_private(clients_file(home, role), f"# eddy's local broker, principal User:{role} (client certificate)\n{text}")


def role_redis_url(url: str, role: str, password: str, ca: Path | None) -> str:
    """`url` (the local Redis) as `role` signs in to it: user and password, rediss:// with the CA for TLS."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}:{parts.port or 6379}"
    scheme, query = ("rediss", urlencode({"ssl_ca_certs": str(ca)})) if ca is not None else ("redis", "")
    return urlunsplit((scheme, netloc, parts.path or "/0", query, ""))


def write_redis_clients(home: Path, url: str, roles: Iterable[str], ca: Path | None) -> None:
    known = passwords(home, roles)
    for role in roles:
        write_private(redis_url_file(home, role), role_redis_url(url, role, known[role], ca) + "\n")


def local_kafka_properties(home: Path, bootstrap: str, role: str = ADMIN) -> dict[str, str] | None:
    """The client settings of `role` (without the file's bootstrap.servers) when `bootstrap` is this home's
    secure local broker, else None."""
    from streams.kafka import parse_properties

    path = kafka_client_file(home, role)
    if not path.exists():
        return None
    props = parse_properties(path.read_text(), source=str(path))
    if props.pop("bootstrap.servers", None) != bootstrap:
        return None
    return props


def local_redis_url(home: Path, url: str, role: str = ADMIN) -> str | None:
    """`role`'s URL when `url` names this home's local Redis with ACL users (and carries no user), else None."""
    parts = urlsplit(url)
    path = redis_url_file(home, role)
    if parts.username or parts.password or parts.scheme not in ("redis", "rediss") or not path.exists():
        return None
    known = urlsplit(path.read_text().strip())
    return known.geturl() if (known.hostname, known.port) == (parts.hostname, parts.port or 6379) else None


def principal(props: Mapping[str, str]) -> dict[str, Any]:
    """What `eddy status` shows of a client's identity: its principal and whether it speaks TLS."""
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    user = props.get("sasl.username")
    return {"principal": f"User:{user}" if user else ("User:ANONYMOUS" if protocol in ("PLAINTEXT", "SSL") else None),
            "tls": protocol in ("SSL", "SASL_SSL")}


def require_role(role: str, roles: Iterable[str]) -> str:
    if role not in roles:
        raise ConfigError(f"no role {role!r}: use one of {', '.join(roles)}")
    return role
