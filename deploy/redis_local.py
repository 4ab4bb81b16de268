"""The local redis-server: AOF on, data under EDDY_HOME, started only on a free loopback port."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from urllib.parse import urlsplit

from deploy.processes import ProcessTable, is_loopback, port_holder, port_open
from deploy.settings import Settings, child_environment, redact_url
from features.errors import ServiceError

NAME = "redis"
START_DEADLINE_S = 30.0


@dataclass(frozen=True)
class RedisInfo:
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


def ensure_redis(settings: Settings, table: ProcessTable) -> RedisInfo:
    """Use the Redis EDDY_REDIS_URL names, starting redis-server only on a free loopback port."""
    url = settings.redis_url
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    shown = redact_url(url)
    if parts.scheme == "unix" or not is_loopback(host):
        if not ping(url, timeout_s=10):
            raise ServiceError(f"Redis at {shown} does not answer PING: check EDDY_REDIS_URL")
        return RedisInfo(False, shown)
    record = table.get(NAME)
    if record is not None and record.alive():
        return RedisInfo(True, shown, pid=record.pid)
    if port_open(host, port):
        if ping(url):
            return RedisInfo(False, shown)
        holder = port_holder(port) or "another process"
        raise ServiceError(
            f"{host}:{port} is held by {holder}, which does not answer as Redis: "
            "stop it, or set EDDY_REDIS_URL to a free port"
        )
    server = shutil.which("redis-server")
    if server is None:
        raise ServiceError("redis-server is not installed: run `make setup` (or apt-get install redis-server)")
    data = settings.home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"bind {host}", f"port {port}", f"dir {data}", "appendonly yes", "appendfsync everysec",
             'save ""', "daemonize no", 'logfile ""']
    if parts.password:
        lines.append(f"requirepass {parts.password}")
    # A config file, not argv, so a password never shows in the process table or the pid record.
    config = data / "redis.conf"
    config.touch(mode=0o600)
    config.write_text("\n".join(lines) + "\n")
    record = table.start(NAME, [server, str(config)], child_environment(settings), address=shown)
    took = table.wait_healthy(record, lambda: ping(url, 0.5), START_DEADLINE_S, "redis-server")
    return RedisInfo(True, shown, took, record.pid)
