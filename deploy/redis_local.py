"""The local redis-server: AOF on, data under EDDY_HOME, started only on a free loopback port."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from urllib.parse import urlsplit

from deploy import security
from deploy.access import ROLES, redis_acls
from deploy.environment import child_environment
from deploy.processes import ProcessTable, is_loopback, listen_address, port_holder, port_open
from deploy.settings import Settings, local_credentials, redact_url
from features.errors import ServiceError
from features.spec import load_spec

NAME = "redis"
START_DEADLINE_S = 30.0


@dataclass(frozen=True)
class ServiceInfo:
    """A local service as `eddy up` found it: whether eddy manages it, where it answers, how long its start
    took, its process."""

    managed: bool
    address: str
    start_s: float = 0.0
    pid: int | None = None




def ping(url: str, timeout_s: float = 2.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


def ensure_redis(settings: Settings, table: ProcessTable) -> ServiceInfo:
    """Use the Redis EDDY_REDIS_URL names, starting redis-server only on a free loopback port: with a
    user per role (deploy.access) and no anonymous access unless settings.insecure, TLS-only with
    settings.redis_tls."""
    url = settings.redis_url
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    shown = redact_url(url)
    if parts.scheme == "unix" or not is_loopback(host):
        if not ping(url, timeout_s=10):
            raise ServiceError(f"Redis at {shown} does not answer PING: check EDDY_REDIS_URL")
        return ServiceInfo(False, shown)
    data = settings.home / "redis"
    config = data / "redis.conf"
    record = table.get(NAME)
    if record is not None and record.alive():
        secure = config.exists() and "user admin " in config.read_text()
        if secure == settings.insecure:
            running, wanted = ("with ACL users", "--insecure") if secure else ("open (--insecure)", "secure")
            raise ServiceError(f"the local Redis runs {running}: `eddy down` first to start it {wanted}")
        return ServiceInfo(True, shown, pid=record.pid)
    host, port = listen_address("EDDY_REDIS_LISTEN", settings.redis_listen, host, port, "127.0.0.1:16379")
    if port_open(host, port):
        if not settings.redis_listen and ping(url):
            return ServiceInfo(False, shown)
        holder = port_holder(port) or "another process"
        raise ServiceError(
            f"{host}:{port} is held by {holder}, which does not answer as Redis: "
            f"stop it, or set {'EDDY_REDIS_LISTEN' if settings.redis_listen else 'EDDY_REDIS_URL'} to a free port"
        )
    server = shutil.which("redis-server")
    if server is None:
        raise ServiceError("redis-server is not installed: run `make setup` (or apt-get install redis-server)")
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"bind {host}", f"dir {data}", "appendonly yes", "appendfsync everysec",
             'save ""', "daemonize no", 'logfile ""',
             # bounded, and nothing evicted: a full Redis refuses writes, which the stages wait out
             f"maxmemory {settings.redis_maxmemory}", "maxmemory-policy noeviction"]
    if settings.insecure:
        security.forget_clients(settings.home, "redis")
        lines.append(f"port {port}")
        if parts.password:
            lines.append(f"requirepass {parts.password}")
    else:
        lines += _secure_lines(settings, host, port)
    # A config file, not argv, so no password or hash shows in the process table or the pid record.
    security.write_private(config, "\n".join(lines) + "\n")
    record = table.start(NAME, [server, str(config)], child_environment(settings), address=shown)
    admin_url = local_credentials(settings).redis_url
    took = table.wait_healthy(record, lambda: ping(admin_url, 0.5), START_DEADLINE_S, "redis-server")
    return ServiceInfo(True, shown, took, record.pid)


def _secure_lines(settings: Settings, host: str, port: int) -> list[str]:
    """redis.conf's users (one per role, by the hash of its password; no default user) and, with
    redis_tls, the TLS-only listener; writes the roles' URLs first."""
    spec = load_spec(settings.pipeline)
    known = security.passwords(settings.home, ROLES)
    lines = []
    ca = None
    if settings.redis_tls:
        pki = security.ensure_pki(settings.home, [host])
        ca = pki.ca
        lines += ["port 0", f"tls-port {port}", f"tls-cert-file {pki.server_cert}", f"tls-key-file {pki.server_key}",
                  f"tls-ca-cert-file {pki.ca}", "tls-auth-clients no"]
    else:
        lines.append(f"port {port}")
    security.write_redis_clients(settings.home, settings.redis_url, ROLES, ca)
    lines.append("user default off resetkeys -@all")
    for role, rules in redis_acls(spec).items():
        digest = hashlib.sha256(known[role].encode()).hexdigest()
        lines.append(f"user {role} on #{digest} {rules}")
    return lines
