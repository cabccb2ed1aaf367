"""Redis clients: the one place a `redis.Redis` is built from a URL, with one timeout and retry policy.

Clients that work (registry, backpressure, beat) wait out a Redis restart; probes (checks, scrapes) never block.
"""

from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url

CONNECT_TIMEOUT_S = 5.0
# a Redis restart is waited out (about a minute of backoff), not turned into a failed chunk or command
RETRIES = 20
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
HEALTH_CHECK_INTERVAL_S = 30
# a probe answers within this or reports the outage: a CLI check or a metrics scrape must not hang
PROBE_TIMEOUT_S = 2.0


def redis_options(*, probe: bool = False) -> dict[str, Any]:
    """The keyword arguments every client gets (RedBeat, which builds its own client, gets them too).

    A new dict each call: redis-py updates a `Retry` it is given, so clients never share one."""
    if probe:
        return {
            "socket_connect_timeout": PROBE_TIMEOUT_S,
            "socket_timeout": PROBE_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0),
        }
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries=RETRIES),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def redis_client(url: str, *, probe: bool = False, decode_responses: bool = False) -> redis.Redis:
    """A client for `url`: retrying with backoff, or with `probe` one short try that never blocks."""
    return redis.Redis.from_url(url, decode_responses=decode_responses, **redis_options(probe=probe))


def check_reachable(url: str) -> None:
    """Fail fast (UserError, one line) when Redis cannot be reached, instead of retrying for a minute."""
    probe = redis_client(url, probe=True)
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise UserError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
    finally:
        probe.close()
