"""KEDA's view of the queue: the connection fields of the Redis list triggers that scale the workers,
one trigger per lane (named for it), each reading the list Celery keeps for the queue's lane.

They are derived from IMAGEMILL_BROKER_URL and IMAGEMILL_QUEUE, so the triggers' host, database and
TLS follow the broker; `imagemill deploy keda` renders deploy/k8s/keda-scaledobject.yaml with them.
"""

import json
import re
from urllib.parse import urlsplit

from imagemill.core.errors import UserError
from imagemill.core.lanes import Lane, lane_list
from imagemill.core.redaction import redact_url

REDIS_PORT = 6379
# the trigger lines rendered: a trigger's `name: <lane>`, then its `  address: ...` and the like
_LINE = re.compile(
    r"^(?P<indent>[ \t]+)(?:- )?(?P<key>name|address|databaseIndex|listName|enableTLS):(?P<value>[^\n]*)$",
    re.MULTILINE,
)
FIELDS = ("address", "databaseIndex", "listName", "enableTLS")


def trigger_fields(broker_url: str, queue: str, lane: Lane = Lane.URGENT) -> dict[str, str]:
    """The KEDA `redis` trigger's connection metadata for a Celery broker URL: host and port,
    database, TLS exactly when the URL is rediss://, and the list Celery keeps for `queue`'s `lane`."""
    parts = urlsplit(broker_url)
    try:
        port = parts.port or REDIS_PORT
    except ValueError as exc:  # a port that is not a number
        raise UserError(f"IMAGEMILL_BROKER_URL {redact_url(broker_url)}: {exc}") from None
    if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
        raise UserError(
            f"IMAGEMILL_BROKER_URL {redact_url(broker_url)}: KEDA's redis trigger needs a redis:// or rediss:// URL"
        )
    database = parts.path.strip("/") or "0"
    if not database.isdigit():
        raise UserError(f"IMAGEMILL_BROKER_URL {redact_url(broker_url)}: the database must be a number, not {database}")
    return {
        "address": f"{parts.hostname}:{port}",
        "databaseIndex": database,
        "listName": lane_list(queue, lane),
        "enableTLS": "true" if parts.scheme == "rediss" else "false",
    }


def render_scaled_object(manifest: str, broker_url: str, queue: str) -> str:
    """`manifest` (the ScaledObject's YAML, comments kept) with each lane trigger's connection fields
    set from the broker URL, the queue and the trigger's lane (its `name`, which comes first). Every
    lane must have one trigger, and each field must be in it exactly once."""
    fields = {lane: trigger_fields(broker_url, queue, lane) for lane in Lane}
    seen = {(lane, key): 0 for lane in Lane for key in FIELDS}
    current: Lane | None = None

    def replace(line: re.Match[str]) -> str:
        nonlocal current
        key = line["key"]
        if key == "name":
            value = line["value"].strip().strip("\"'")
            if value in set(Lane):
                current = Lane(value)
            return line[0]
        if current is None:
            raise UserError(f"the KEDA manifest sets {key} in a redis trigger without a lane's name before it")
        seen[(current, key)] += 1
        return f"{line['indent']}{key}: {json.dumps(fields[current][key])}"  # a quoted YAML string

    rendered = _LINE.sub(replace, manifest)
    wrong = sorted(f"{lane}.{key}" for (lane, key), count in seen.items() if count != 1)
    if wrong:
        raise UserError(
            "the KEDA manifest should have one redis trigger per lane (named urgent, normal, backfill),"
            f" setting each of its fields once: not so for {', '.join(wrong)}"
        )
    return rendered
