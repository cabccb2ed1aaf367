"""Where workers may read images and write records: the URI prefixes of IMAGEMILL_ALLOWED_SOURCES and
IMAGEMILL_ALLOWED_SINKS, and how a location is matched against them.

A location is normalised first (`..` resolved, symbolic links followed, a database URL reduced to
the server and database it connects to) and then compared by whole path segments, so that
`s3://photos` never admits `s3://photos-evil/…` and `file:///data` never admits `file:///data2` or
`file:///data/../etc/passwd`. Which locations a chunk touches is the worker's business
(`imagemill.worker.confinement`); this module only speaks the prefix language.
"""

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

SOURCES_VARIABLE = "IMAGEMILL_ALLOWED_SOURCES"
SINKS_VARIABLE = "IMAGEMILL_ALLOWED_SINKS"
SOURCE_FORMS = "s3://bucket/prefix/, file:///dir/ or /dir/"
SINK_FORMS = "postgresql://host[:port]/db, s3://bucket/prefix/, s3tags://bucket/prefix/, file:///dir/ or /dir/"
PG_DEFAULT_PORT = "5432"
_PG_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class Place:
    """A normalised location: its kind (`s3`, `s3tags`, `file`, `postgresql`), its root (a bucket, a
    database server; empty in a prefix: any) and its path segments (a key's, a path's, the database)."""

    scheme: str
    root: str
    segments: tuple[str, ...]

    def within(self, prefix: "Place") -> bool:
        """Whether this location lies at or under `prefix`, segment by segment."""
        return (
            self.scheme == prefix.scheme
            and (not prefix.root or self.root == prefix.root)
            and self.segments[: len(prefix.segments)] == prefix.segments
        )


def local_place(path: Path) -> Place:
    """A local path as the file system will open it: absolute, `..` resolved, links followed."""
    return Place("file", "", Path(os.path.realpath(path)).parts)


def object_places(scheme: str, bucket: str, key: str) -> list[Place]:
    """An object as written (its key's segments verbatim) and as a server that folds `.` and `..`
    segments of the request path (some S3 clones do) would see it: both must be allowed."""
    written = Place(scheme, bucket, tuple(key.split("/")))
    bucket_seen, _, key_seen = posixpath.normpath(f"/{bucket}/{key}").lstrip("/").partition("/")
    folded = Place(scheme, bucket_seen, tuple(key_seen.split("/")) if key_seen else ())
    return [written] if folded == written else [written, folded]


def database_place(url: str) -> Place:
    """`postgresql://user:pw@DB/annotations?table=t` -> root `host=db;hostaddr=;port=5432;service=`,
    segments (`annotations`,): the server and database it connects to, whatever its user, password or
    sink options. libpq's own query parameters (`host=`, `hostaddr=`, `port=`, `dbname=`, `service=`)
    override the URL's parts, as libpq reads them; several hosts (`h1,h2:5433`) stay one string."""
    base, _, query = url.partition("?")
    parts = urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    port = ""
    if "," not in host and host.rpartition(":")[2].isdigit():
        host, _, port = host.rpartition(":")
    target = {"host": unquote(host), "hostaddr": "", "port": port, "dbname": unquote(parts.path.lstrip("/"))}
    target["service"] = ""
    for option in query.split("&"):
        name, _, value = (unquote(piece) for piece in option.partition("="))
        if name in target:
            target[name] = value
    if target["host"] and "," not in target["host"]:
        target["port"] = target["port"] or PG_DEFAULT_PORT
    # host names are case-insensitive; a database name is not
    root = ";".join(f"{name}={target[name].lower()}" for name in ("host", "hostaddr", "port", "service"))
    return Place("postgresql", root, (target["dbname"],))


def source_prefix(text: str) -> Place:
    """One entry of IMAGEMILL_ALLOWED_SOURCES; ValueError saying what is expected."""
    return _prefix(text, ("s3", "file"), SOURCE_FORMS)


def sink_prefix(text: str) -> Place:
    """One entry of IMAGEMILL_ALLOWED_SINKS; ValueError saying what is expected."""
    return _prefix(text, ("s3", "s3tags", "file", *_PG_SCHEMES), SINK_FORMS)


def _prefix(text: str, schemes: tuple[str, ...], forms: str) -> Place:
    entry = text.strip()
    if entry.startswith("/"):
        entry = Path(entry).as_uri()
    scheme, sep, rest = entry.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in schemes:
        raise ValueError(f"expected {forms}")
    if scheme in _PG_SCHEMES:
        if not rest:
            return Place("postgresql", "", ())  # any database server
        place = database_place(entry)
        if place.root.startswith("host=;"):
            raise ValueError(
                "expected the database server named, postgresql://host[:port]/db, or postgresql:// for any"
            )
        # no database named: any database on that server
        return place if place.segments != ("",) else Place(place.scheme, place.root, ())
    if scheme == "file":
        parts = urlsplit(entry)
        if parts.netloc not in ("", "localhost") or parts.query or not parts.path.startswith("/"):
            raise ValueError("expected file:///absolute/dir/")
        return local_place(Path(unquote(parts.path)))
    bucket, _, key = rest.partition("?")[0].partition("/")
    segments = tuple(segment for segment in key.split("/") if segment)
    if any(segment in (".", "..") for segment in segments) or (segments and not bucket):
        raise ValueError(f"expected {scheme}://bucket/prefix/ without '.' or '..' segments")
    return Place(scheme, bucket, segments)


def admitted(places: Iterable[Place], prefixes: Iterable[Place]) -> bool:
    """Whether every one of `places` lies under one of `prefixes`."""
    allowed = list(prefixes)
    return all(any(place.within(prefix) for prefix in allowed) for place in places)
