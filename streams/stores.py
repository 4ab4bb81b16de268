"""Redis as every stage opens it: calls that fail within seconds instead of hanging on a Redis that is
paused or gone, and the errors that mean "wait and try again" rather than "this process is broken"."""

from __future__ import annotations

import redis
from redis import exceptions

# Seconds a call may wait on the socket: a stalled Redis becomes a TimeoutError the loop waits out.
SOCKET_TIMEOUT_S = 5.0

# A Redis that is unreachable, paused, loading, refusing writes for memory or disk, or failing over:
# a stage aborts the batch in hand, backs off and tries again; nothing of the batch commits meanwhile.
TRANSIENT = (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.BusyLoadingError,
             exceptions.OutOfMemoryError, exceptions.TryAgainError, exceptions.ReadOnlyError,
             exceptions.MasterDownError, exceptions.ClusterDownError)


def is_transient(exc: BaseException) -> bool:
    """True for a Redis error to wait out; MISCONF (persistence failing, writes refused) counts too."""
    return isinstance(exc, TRANSIENT) or (
        isinstance(exc, exceptions.ResponseError) and str(exc).startswith("MISCONF"))


def redis_client(url: str) -> redis.Redis:
    """A client whose calls give up after SOCKET_TIMEOUT_S, checking an idle connection before use."""
    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
                                health_check_interval=10)
