"""What a chunk may touch: every image it would read and the sink it would write, checked against
IMAGEMILL_ALLOWED_SOURCES and IMAGEMILL_ALLOWED_SINKS before anything is read or written.

Whoever can write to the broker (or the job registry) chooses both, so a worker refuses a chunk
outside them as a permanent fault of its job. Unset lists admit remote sinks only (any s3://
object, database or bucket) and no local path.
"""

from collections.abc import Callable, Sequence

from imagemill.core.allowlists import (
    SINKS_VARIABLE,
    SOURCES_VARIABLE,
    Place,
    admitted,
    database_place,
    local_place,
    object_places,
    sink_prefix,
    source_prefix,
)
from imagemill.core.errors import UserError
from imagemill.core.images import is_s3, local_path, parse_s3
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings

# what an unset list admits: remote sinks, whose reach the worker's own credentials already bound
DEFAULT_SOURCES = (Place("s3", "", ()),)
DEFAULT_SINKS = (Place("s3", "", ()), Place("s3tags", "", ()), Place("postgresql", "", ()))
REMOTE_SOURCES = "any s3:// object"
REMOTE_SINKS = "any postgresql://, s3:// or s3tags:// store"
_SHOWN_REFS = 3
_NOWHERE = Place("", "", ())  # a location no prefix admits (not one a sink could open)


class NotAllowed(UserError):
    """A chunk would read or write outside the allow-lists; its job fails at once, nothing touched."""


def check_chunk(refs: Sequence[ImageRef], sink: str, settings: Settings) -> None:
    """NotAllowed, naming the setting, unless every image of `refs` and the sink `sink` (and, for
    `s3tags://`, every object it would tag) lie within the allow-lists."""
    sources = _prefixes(settings.allowed_sources, source_prefix, DEFAULT_SOURCES)
    # a bad manifest line (`problem` set) has nothing to read: its record only carries the reason
    read = [ref.uri for ref in refs if ref.problem is None]
    outside = [uri for uri in read if not admitted(source_places(uri), sources)]
    if outside:
        raise NotAllowed(_refusal(SOURCES_VARIABLE, settings.allowed_sources, outside, "read", REMOTE_SOURCES))
    sinks = _prefixes(settings.allowed_sinks, sink_prefix, DEFAULT_SINKS)
    if sink.startswith("s3tags://"):
        # the tags go onto each image's own object: each of those is a place written
        tagged = [uri for uri in read if is_s3(uri)]
        outside = [uri for uri in tagged if not admitted(_tag_places(uri), sinks)]
        if outside:
            raise NotAllowed(_refusal(SINKS_VARIABLE, settings.allowed_sinks, outside, "tag", REMOTE_SINKS))
    elif not admitted(sink_places(sink), sinks):
        shown = redact_url(sink)
        raise NotAllowed(_refusal(SINKS_VARIABLE, settings.allowed_sinks, [shown], "write to", REMOTE_SINKS))


def source_places(uri: str) -> list[Place]:
    """Where reading `uri` goes, as `ObjectReader` reads it: an S3 object, else a local path."""
    if is_s3(uri):
        try:
            location = parse_s3(uri)
        except ValueError:  # no bucket: nothing a prefix could name
            return [_NOWHERE]
        return object_places("s3", location.bucket, location.key)
    return [local_place(local_path(uri))]


def sink_places(sink: str) -> list[Place]:
    """Where writing to the sink URL `sink` goes, as `open_sink` opens it (sink options ignored)."""
    scheme = sink.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres"):
        return [database_place(sink)]
    base = sink.partition("?")[0]
    if scheme == "s3":
        bucket, _, prefix = base[len("s3://") :].partition("/")
        return object_places("s3", bucket, prefix.rstrip("/"))
    if scheme == "file" or "://" not in sink:  # a file:/// directory, or local mode's .jsonl/.parquet path
        return [local_place(local_path(base))]
    return [_NOWHERE]  # a scheme no sink writes


def _tag_places(uri: str) -> list[Place]:
    location = parse_s3(uri)
    return object_places("s3tags", location.bucket, location.key)


def _prefixes(
    entries: tuple[str, ...] | None, parse: Callable[[str], Place], default: tuple[Place, ...]
) -> list[Place]:
    # parsed again here, not kept from the settings' validation: Settings holds the text as given
    return list(default) if entries is None else [parse(entry) for entry in entries]


def _refusal(variable: str, entries: tuple[str, ...] | None, outside: list[str], verb: str, default: str) -> str:
    more = len(outside) - _SHOWN_REFS
    shown = ", ".join(outside[:_SHOWN_REFS]) + (f" and {more} more" if more > 0 else "")
    if entries is None:
        allowed = f"unset, it allows {default} and no local path"
    else:
        allowed = f"it allows {', '.join(redact_url(entry) for entry in entries)}"
    return f"{variable} does not allow this chunk to {verb} {shown} ({allowed})"
