"""PostgreSQL sink: one upserted row per record key (uri, etag, signature), one transaction per chunk.

Owns the records table (`imagemill_records`, or `?table=`), its view of the current records
(`imagemill_current`, or `<table>_current`: see `current_view`), the `imagemill_meta` schema
version, and a connection. The table keeps history; the view answers "what is true now":

- a complete listing of a prefix (`listing`) sets `deleted_at` on the rows of objects under it
  that it no longer lists, and clears it on rows of objects listed again;
- the same listing sets `superseded_at` on rows whose etag is not the one it listed (the object
  was replaced), and clears it on rows of the listed etag (the object went back to that version);
- the view holds, per uri, the most recently processed row that is neither deleted nor superseded:
  the object's current version as last listed, annotated by the newest pipeline run on it. Where no
  listing has spoken (a manifest, rows from before schema version 2) the newest row wins.

A record's embedding is also kept in the `embedding` column for SQL: `real[]`, or pgvector's
`vector` when the database has the extension installed when the table is made (`embedding_type`).
The review queue's column (`review_state`) and partial indexes on the table are made here too
(`add_review_indexes`), and every connection imagemill opens to PostgreSQL is opened by `connect`.
"""

import hashlib
import itertools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import orjson
import psycopg
from psycopg import IsolationLevel, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from imagemill.core.batching import batched
from imagemill.core.closing import Closing
from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url, scrub_secret
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.sinks.base import (
    DEFAULT_BATCH,
    Key,
    ListingMarks,
    ObjectChange,
    RetaggedRow,
    SinkContext,
    StoredEmbeddings,
    first_error,
)
from imagemill.core.sinks.options import split_options

log = logging.getLogger(__name__)

# 1: the records table; 2: written_at, superseded_at, deleted_at and the current view; 3: embedding
SCHEMA_VERSION = 3
DEFAULT_TABLE = "imagemill_records"
KEYS_PER_QUERY = 1000
# listed (uri, etag) pairs sent per COPY: each COPY is its own short transaction, so a listing of
# millions of objects never holds a transaction open (which would hold back VACUUM everywhere)
LISTED_PER_COPY = 10_000
# any constant works as long as every imagemill process uses the same one ("imgmill" in ASCII)
_SCHEMA_LOCK = 0x696D676D696C6C
# lowercase so people can query it unquoted; short so "<table>_job_id_idx" stays within 63 bytes
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
# one snapshot cursor per read; the name only has to be unique on its connection
_CURSOR = "imagemill_read_records"
# the review queue's audit sample: the first 32 bits of md5(uri), an unsigned number below 2^32; its
# queries must spell it exactly as its index does, or the planner cannot use the index
AUDIT_HASH = "(('x' || substr(md5({uri}), 1, 8))::bit(32)::bigint)"


class SchemaVersionError(UserError):
    """The database was set up by a newer imagemill than this one."""


def current_view(table: str) -> str:
    """The view of a records table's current records: `imagemill_records` -> `imagemill_current`,
    any other table `t` -> `t_current`."""
    return "imagemill_current" if table == DEFAULT_TABLE else f"{table}_current"


def split_table(url: str) -> tuple[str, str]:
    """`postgresql://…/db?table=t&x=y` -> (`postgresql://…/db?x=y`, `t`); the default table when absent."""
    # libpq's own parameters are passed through byte for byte: libpq percent-decodes but never turns `+` into a space
    conninfo, options = split_options(url, {"table"}, pass_unknown=True)
    table = options.get("table", DEFAULT_TABLE)
    if not _TABLE_NAME.fullmatch(table):
        raise UserError(f"sink {redact_url(url)}: table {table!r} must be lowercase letters, digits and _ (at most 48)")
    return conninfo, table


def connect(
    conninfo: str, url: str, *, autocommit: bool = True, application_name: str = "imagemill"
) -> psycopg.Connection[Any]:
    """A connection to `conninfo` (the sink `url` less imagemill's own options), the one way imagemill
    opens one: a 10 s connect timeout and `application_name` unless the URL sets them (without a
    timeout libpq waits for the kernel, minutes, on an unreachable host). OperationalError, its
    message without the password the driver may quote, when the server cannot be reached."""
    given = conninfo_to_dict(conninfo)
    defaults: dict[str, Any] = {"connect_timeout": 10, "application_name": application_name}
    try:
        return psycopg.connect(
            conninfo, autocommit=autocommit, **{key: value for key, value in defaults.items() if key not in given}
        )
    except psycopg.OperationalError as exc:
        # transient for a worker (Celery retries); a command turns it into a message for a person
        raise psycopg.OperationalError(scrub_secret(str(exc), url)) from None


class PostgresSink(SinkContext):
    """A Sink on PostgreSQL. One connection, opened on first use and reopened after it breaks;
    not for sharing between threads (open one sink per thread or process). `with` closes it."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conninfo, self._table = split_table(url)
        self._check_parses()
        self._conn: psycopg.Connection[Any] | None = None
        self._lz4: bool | None = None  # the server's lz4 compression, once asked (`_fast_compression`)
        self._upsert = _upsert_sql(self._table)

    @property
    def table(self) -> str:
        return self._table

    @property
    def view(self) -> str:
        """The view of the current records (one row per uri, deleted and replaced versions left out)."""
        return current_view(self._table)

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        """Upsert a chunk in one transaction: all rows become visible together, or none do.

        OperationalError propagates (the caller retries the chunk); the connection is dropped first
        so the retry gets a fresh one."""
        if not records:
            return
        rows = [_row(record) for record in records]
        with self._session() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(self._upsert, rows)

    def count(self, job_id: str | None = None) -> int:
        """How many records the table holds (of one job)."""
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(self._table))
        statement, params = _where_job(query, job_id)
        with self._session() as conn:
            row = conn.execute(statement, params).fetchone()
        return int(row[0]) if row else 0

    def records(self, job_id: str | None = None) -> list[Record]:
        """Every stored record (of one job), read back from the jsonb column, in key order."""
        query = sql.SQL("SELECT record FROM {}").format(sql.Identifier(self._table))
        statement, params = _where_job(query, job_id)
        statement = sql.SQL("{} ORDER BY uri, etag, signature").format(statement)
        with self._session() as conn:
            rows = conn.execute(statement, params).fetchall()
        return [Record.model_validate(row[0]) for row in rows]

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]:
        """The given keys that already have a record without an error (those can be skipped)."""
        found: set[Key] = set()
        for batch in batched(dict.fromkeys(keys), KEYS_PER_QUERY):
            stored = self._stored_ok_keys(batch)
            found.update(key for key in batch if _stored_key(key) in stored)
        return found

    def listing(self, uri_prefix: str) -> "PostgresListing":
        """Follow a listing of everything under `uri_prefix` on a connection of its own (`MarksDeleted`)."""
        return PostgresListing(self._connect(), self._table, uri_prefix)

    def mark_events(self, created: Sequence[ObjectChange], removed: Sequence[ObjectChange]) -> ListingMarks:
        """Mark what upload events say, in one transaction (`MarksDeleted`): a removed object's rows
        are deleted, a created object's rows of other etags superseded, and its rows of the created
        etag (or all of them, if it had been deleted) current again. Marks carry the event's time;
        an event marks only rows written before it, and brings back only rows marked before it, so
        an event that arrives late never undoes what a later one said."""
        if not created and not removed:
            return ListingMarks()
        counts: dict[str, int] = {}
        with self._session() as conn, conn.transaction():
            for name, statement, changes in _event_sql(self._table, created, removed):
                columns = [list(column) for column in zip(*changes, strict=True)] if changes else [[], [], []]
                counts[name] = counts.get(name, 0) + conn.execute(statement, columns).rowcount
        return ListingMarks(**counts)

    def failed_records(self, job_id: str) -> list[Record]:
        """The job's records that carry an error (for `imagemill retry`)."""
        query = sql.SQL("SELECT record FROM {} WHERE job_id = %s AND error_kind IS NOT NULL ORDER BY uri").format(
            sql.Identifier(self._table)
        )
        with self._session() as conn:
            return [Record.model_validate(row[0]) for row in conn.execute(query, (job_id,)).fetchall()]

    def read(self, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]:
        """The current records (the view), or with `history` every row of the table, in key order, as
        RECORDS (`ReadableSink`): one server-side cursor in one read-only snapshot, so rows written
        while reading (retag's own new rows) are never read back. UserError, one line, for a
        database that cannot be read or has no such table; checked before the first batch is asked for."""
        self._check_readable()
        return self._rows(self._table if history else self.view, batch_size)

    def read_embeddings(self, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[StoredEmbeddings]:
        """What `read` reads, as keys and embeddings only (`StoredEmbeddings`), in columnar batches:
        the vectors come from the records' own base64 (every row has it; the `embedding` column
        only rows written since schema version 3) decoded by the server and sent in binary, so no
        record object or JSON document is built here. One snapshot, as for `read`."""
        self._check_readable()
        return self._embeddings(self._table if history else self.view, batch_size)

    def read_json(
        self, *, history: bool = False, batch_size: int = DEFAULT_BATCH, part: "JsonPart | None" = None
    ) -> Iterator[list[dict[str, Any]]]:
        """What `read` reads, as the records' JSON objects (orjson, no record object built: a pass
        that validates only what it cannot use as it is, such as retag's JSON path). One snapshot;
        with `part` (of a `split_json`), the rows of its key range in its snapshot."""
        if part is None:
            self._check_readable()
        return self._json_rows(self._table if history else self.view, batch_size, part)

    @contextmanager
    def split_json(self, parts: int, *, history: bool = False) -> Iterator[list["JsonPart"]]:
        """The records (as `read_json` reads them) cut by key into at most `parts` ranges of about as
        many rows each, all in one snapshot, for readers on other connections (other processes):
        the snapshot is held, its transaction open, until the `with` ends."""
        self._check_readable()
        relation = sql.Identifier(self._table if history else self.view)
        try:
            with connect(self._conninfo, self._url, autocommit=False) as conn:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                row = conn.execute("SELECT pg_export_snapshot()").fetchone()
                assert row is not None
                snapshot = str(row[0])
                counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(relation)).fetchone()
                rows = int(counted[0]) if counted else 0
                key_at = sql.SQL("SELECT uri, etag, signature FROM {} ORDER BY uri, etag, signature OFFSET %s LIMIT 1")
                bounds: list[tuple[str, str, str] | None] = [None]
                for index in range(1, parts):
                    found = conn.execute(key_at.format(relation), (rows * index // parts,)).fetchone()
                    if found is not None and tuple(found) != bounds[-1]:
                        bounds.append((found[0], found[1], found[2]))
                bounds.append(None)
                yield [
                    JsonPart(snapshot, low, high, rows * (index + 1) // parts - rows * index // parts)
                    for index, (low, high) in enumerate(itertools.pairwise(bounds))
                ]
                conn.rollback()
        except psycopg.OperationalError as exc:
            raise UserError(f"RECORDS {redact_url(self._url)}: reading failed ({_reason(exc, self._url)})") from None

    def stored_record(self, uri: str, etag: str, signature: str) -> Record:
        """The whole record of one key (`etag` as the table holds it: '' for none)."""
        query = sql.SQL("SELECT record::text FROM {} WHERE uri = %s AND etag = %s AND signature = %s").format(
            sql.Identifier(self._table)
        )
        with self._session() as conn:
            row = conn.execute(query, (uri, etag, signature)).fetchone()
        if row is None:
            raise UserError(f"RECORDS {redact_url(self._url)}: the record of {uri} went away while reading")
        return self._stored_record(row[0])

    def write_retagged(self, rows: Sequence[RetaggedRow], processed_at: datetime, stamp: str) -> None:
        """New rows for records retagged in place, in one transaction: each a copy of its old row
        with the new signature, `tags` and `task_options` (and `processed_at`: the column
        `processed_at`, the record's JSON `stamp`). Only the keys and the new parts are sent (one
        COPY); the database copies the rest, the embedding included, from the old row."""
        if not rows:
            return
        with self._session() as conn, conn.transaction():
            if self._fast_compression(conn):
                # the new rows' record and embedding (several KB, mostly base64 and floats that hardly
                # compress) are compressed when stored: lz4 tries in a fraction of pglz's time, which
                # is most of the database's work here (for this transaction only; readers see no change)
                conn.execute("SET LOCAL default_toast_compression = lz4")
            conn.execute(_RETAG_TABLE)
            with conn.cursor() as cur, cur.copy(f"COPY {_RETAGGED} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(
                        (row.uri, row.etag, row.old_signature, row.signature, _without_nul(row.tags), row.task_options)
                    )
            conn.execute(_retag_sql(self._table), {"now": processed_at, "stamp": stamp})

    def write_dedup_marks(self, marks: Iterable[tuple[str, str | None, str | None, bool]], threshold: float) -> int:
        """Dedup's marks written back, in one transaction: every row of each (uri, etag, group,
        representative) image version gets `record.dedup` = {group, representative, threshold}, and
        the marks of an earlier dedup are taken off first (an image no longer compared keeps none).
        Only the JSON document changes (no new row, no new key); the count of rows marked."""
        with self._session() as conn, conn.transaction():
            table = sql.Identifier(self._table)
            conn.execute(sql.SQL("UPDATE {} SET record = record - 'dedup' WHERE record ? 'dedup'").format(table))
            conn.execute(_MARKS_TABLE)
            with conn.cursor() as cur, cur.copy(f"COPY {_MARKS} FROM STDIN") as copy:
                for uri, etag, group, representative in marks:
                    copy.write_row((uri, etag or "", group, representative))
            done = conn.execute(
                sql.SQL(
                    "UPDATE {t} AS r SET record = r.record || jsonb_build_object('dedup', jsonb_build_object("
                    "'group', m.grp, 'representative', m.representative, 'threshold', %s::float8))"
                    " FROM {m} AS m WHERE r.uri = m.uri AND r.etag = m.etag"
                ).format(t=table, m=sql.Identifier(_MARKS)),
                (threshold,),
            )
            return done.rowcount

    def _fast_compression(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether the server can store values compressed with lz4 (PostgreSQL 14 and later, when
        built with it); asked once."""
        if self._lz4 is None:
            found = conn.execute(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
            ).fetchone()
            self._lz4 = bool(found and found[0])
        return self._lz4

    def _check_readable(self) -> None:
        where = redact_url(self._url)
        try:
            with connect(self._conninfo, self._url) as conn:
                found = conn.execute("SELECT to_regclass(%s)", (self._table,)).fetchone()
        except psycopg.Error as exc:
            raise UserError(f"RECORDS {where}: cannot read it ({_reason(exc, self._url)})") from None
        if found == (None,):
            raise UserError(f"RECORDS {where}: the database has no table {self._table}")
        # the table exists: opening it checks its schema version and migrates an older one
        self.check()
        self.close()

    def _embeddings(self, relation: str, batch_size: int) -> Iterator[StoredEmbeddings]:
        # the record is read out of its TOAST storage and decompressed once per row, in the middle
        # query (OFFSET 0 keeps the planner from folding it into the outer one, which would do that
        # once per field: twice the server's time), after the rows are sorted (`_KEY_ORDER`)
        query = sql.SQL(
            "SELECT uri, etag, signature, known, e ->> 'model', e ->> 'revision', (e ->> 'dim')::int,"
            " decode(e ->> 'vector', 'base64') FROM (SELECT uri, etag, signature, record ? 'task_options' AS known,"
            " record -> 'embedding' AS e FROM ({}) AS k OFFSET 0) AS r"
        ).format(_in_key_order(relation))
        try:
            with connect(self._conninfo, self._url, autocommit=False) as conn:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                # binary: the vectors arrive as bytes, joined into one matrix per batch
                with conn.cursor(name=_CURSOR, binary=True) as cursor:
                    cursor.execute(query)
                    while rows := cursor.fetchmany(batch_size):
                        yield _stored_embeddings(rows, self._url)
                conn.rollback()
        except psycopg.OperationalError as exc:
            raise UserError(f"RECORDS {redact_url(self._url)}: reading failed ({_reason(exc, self._url)})") from None

    def _rows(self, relation: str, batch_size: int) -> Iterator[list[Record]]:
        query = sql.SQL("SELECT record::text FROM ({}) AS k").format(_in_key_order(relation))
        try:
            with connect(self._conninfo, self._url, autocommit=False) as conn:
                # one snapshot for the whole read: a row written meanwhile (retag writes beside what it
                # reads) is neither read back nor half-seen; the server-side cursor sends a batch at a time
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                with conn.cursor(name=_CURSOR) as cursor:
                    cursor.execute(query)
                    while rows := cursor.fetchmany(batch_size):
                        yield [self._stored_record(text) for (text,) in rows]
                conn.rollback()
        except psycopg.OperationalError as exc:
            raise UserError(f"RECORDS {redact_url(self._url)}: reading failed ({_reason(exc, self._url)})") from None

    def _json_rows(self, relation: str, batch_size: int, part: "JsonPart | None") -> Iterator[list[dict[str, Any]]]:
        low, high = (part.low, part.high) if part is not None else (None, None)
        query = sql.SQL("SELECT record::text FROM ({}) AS k").format(_in_key_order(relation, low, high))
        try:
            with connect(self._conninfo, self._url, autocommit=False) as conn:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ  # one snapshot, as `_rows`
                conn.read_only = True
                if part is not None:  # the snapshot of the split: the first statement of the transaction
                    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(part.snapshot)))
                with conn.cursor(name=_CURSOR) as cursor:
                    cursor.execute(query, [*(low or ()), *(high or ())])
                    while rows := cursor.fetchmany(batch_size):
                        yield [orjson.loads(text) for (text,) in rows]
                conn.rollback()
        except psycopg.OperationalError as exc:
            raise UserError(f"RECORDS {redact_url(self._url)}: reading failed ({_reason(exc, self._url)})") from None

    def _stored_record(self, text: str) -> Record:
        try:
            return Record.model_validate_json(text)
        except ValidationError as exc:
            where = redact_url(self._url)
            raise UserError(f"RECORDS {where}: holds a row that is not a record ({first_error(exc)})") from None

    def add_review_indexes(self, labels: Sequence[str], audit_below: int) -> None:
        """The review queue's column (`review_state`) and partial indexes on the table, made once under
        the schema lock (`review_index_sql`); the indexes of an earlier imagemill's queue are dropped."""
        with self._session() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if not _has_column(conn, self._table, REVIEW_STATE):
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN review_state text").format(sql.Identifier(self._table)))
            for old in ("review_idx", "review_job_idx", "audit_idx"):
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(f"{self._table}_{old}")))
            for name, statement in review_index_sql(self._table, labels, audit_below, conn):
                # CREATE INDEX locks out writers while it builds: only the missing ones are made
                if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
                    conn.execute(statement)

    def check(self) -> None:
        """Connect now (creating the tables); UserError with a one-line reason if that fails."""
        try:
            self._connection()
        except psycopg.OperationalError as exc:
            raise UserError(f"cannot connect to {redact_url(self._url)}: {exc}") from None

    def close(self) -> None:
        """Close the connection (each chunk was committed when written); the next use reopens it."""
        self._discard()

    # -- connection --------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._connection()
        try:
            yield conn
        except psycopg.OperationalError:
            # the database went away mid-call: reconnect next time instead of failing on a dead socket
            self._discard()
            raise

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self._discard()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> psycopg.Connection[Any]:
        # autocommit, so that every `conn.transaction()` is a real BEGIN/COMMIT, never a savepoint
        conn = connect(self._conninfo, self._url)
        try:
            _ensure_schema(conn, self._table, redact_url(self._url))
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_parses(self) -> None:
        try:
            conninfo_to_dict(self._conninfo)
        except psycopg.Error as exc:
            # the driver's message may quote the whole URL, password included
            raise UserError(f"sink {redact_url(self._url)}: {scrub_secret(str(exc), self._url)}") from None

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _stored_ok_keys(self, batch: list[Key]) -> set[Key]:
        query = sql.SQL(
            "SELECT r.uri, r.etag, r.signature"
            " FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(uri, etag, signature)"
            " JOIN {} AS r USING (uri, etag, signature) WHERE r.error_kind IS NULL"
        ).format(sql.Identifier(self._table))
        stored = [_stored_key(key) for key in batch]
        columns = [list(column) for column in zip(*stored, strict=True)]
        with self._session() as conn:
            return {(uri, etag, signature) for uri, etag, signature in conn.execute(query, columns).fetchall()}


def _in_key_order(relation: str, low: Any = None, high: Any = None) -> sql.Composed:
    """The rows of `relation` (keys and record) sorted by key, to be read in that order; with `low`
    and `high` only the keys from `low` (a key, bound first) up to `high` (excluded). The record
    is sorted as it is stored (a pointer to its TOAST storage) and read out only as the rows are
    sent: ordering its JSON text or embedding instead sorts several KB a row, which spills to disk
    past work_mem (a 20,000-row store: 66 MB) and sends nothing before all are read out (half the time)."""
    limits = [
        sql.SQL(f"(uri, etag, signature) {op} (%s, %s, %s)")
        for op, key in ((">=", low), ("<", high))
        if key is not None
    ]
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(limits) if limits else sql.SQL("")
    return sql.SQL("SELECT uri, etag, signature, record FROM {}{} ORDER BY uri, etag, signature OFFSET 0").format(
        sql.Identifier(relation), where
    )


class JsonPart(NamedTuple):
    """One key range of a `split_json`: its snapshot, its first key and the first key past it (None:
    from the first, to the last), and about how many rows it holds."""

    snapshot: str
    low: tuple[str, str, str] | None
    high: tuple[str, str, str] | None
    rows: int


def _stored_embeddings(rows: list[tuple[Any, ...]], url: str) -> StoredEmbeddings:
    models: list[tuple[str, str | None, int] | None] = []
    vectors: list[bytes] = []
    for uri, _, _, _, model, revision, dim, vector in rows:
        if vector is None or model is None or dim is None:
            models.append(None)
            continue
        if len(vector) != 4 * dim:
            raise UserError(f"RECORDS {redact_url(url)}: the embedding of {uri} has {len(vector)} bytes for dim {dim}")
        models.append((model, revision, dim))
        vectors.append(vector)
    dims = {model[2] for model in models if model is not None}
    matrix = np.frombuffer(b"".join(vectors), "<f4").reshape(len(vectors), -1) if len(dims) == 1 else None
    if matrix is None and vectors:  # two sizes in one batch: the retagger refuses them by their models
        matrix = np.zeros((len(vectors), 0), np.float32)
    return StoredEmbeddings(
        uris=[row[0] for row in rows],
        etags=[row[1] for row in rows],
        signatures=[row[2] for row in rows],
        known_options=[bool(row[3]) for row in rows],
        models=models,
        vectors=matrix if matrix is not None else np.zeros((0, 0), np.float32),
    )


# one per connection, emptied at each commit: the keys and new parts of one retagged batch
_RETAGGED = "imagemill_retagged"
_RETAG_TABLE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_RETAGGED} (uri text, etag text, old_signature text, signature text,"
    " tags jsonb, task_options jsonb) ON COMMIT DELETE ROWS"
)


# dedup's marks of one write-back: image versions (uri, etag) with their group and role
_MARKS = "imagemill_dedup_marks"
_MARKS_TABLE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_MARKS} (uri text, etag text, grp text, representative bool)"
    " ON COMMIT DELETE ROWS"
)


def _retag_sql(table: str) -> sql.Composed:
    """Each retagged row: its old row with the new signature, tags, task options and times."""
    keys = ("uri", "etag", "signature")
    updates: list[sql.Composable] = [
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in _COLUMNS if c not in keys
    ]
    updates.append(sql.SQL("written_at = now()"))
    return sql.SQL(
        "INSERT INTO {t} (uri, etag, signature, job_id, flagged, caption, error_kind, processed_at, record, embedding)"
        " SELECT r.uri, r.etag, n.signature, r.job_id, r.flagged, r.caption, r.error_kind, %(now)s,"
        " (r.record - 'task_options') || jsonb_build_object('tags', n.tags, 'signature', n.signature,"
        " 'processed_at', %(stamp)s::text) || CASE WHEN n.task_options IS NULL THEN '{{}}'::jsonb"
        " ELSE jsonb_build_object('task_options', n.task_options) END, r.embedding"
        " FROM {n} AS n JOIN {t} AS r ON r.uri = n.uri AND r.etag = n.etag AND r.signature = n.old_signature"
        " ON CONFLICT (uri, etag, signature) DO UPDATE SET {updates}"
    ).format(t=sql.Identifier(table), n=sql.Identifier(_RETAGGED), updates=sql.SQL(", ").join(updates))


class PostgresListing(Closing):
    """One listing of everything under a URI prefix, followed on a connection of its own (`PrefixListing`).

    The listed (uri, etag) pairs go into a temporary table, one COPY per `LISTED_PER_COPY` as they
    pass, so the Python process holds one batch however long the listing. `finish` marks in the
    database: four UPDATEs joining that table against the records, in one transaction, touching
    only rows whose state changes. If the connection fails while recording, the listing stops being
    recorded (the listing itself goes on) and marks nothing."""

    def __init__(self, conn: psycopg.Connection[Any], table: str, uri_prefix: str) -> None:
        self._conn = conn
        self._table = table
        self._prefix = uri_prefix
        self._complete = False
        self._failed = False
        self.listed = 0
        try:
            conn.execute(f"CREATE TEMPORARY TABLE {_LISTED} (uri text NOT NULL, etag text NOT NULL)")
            row = conn.execute("SELECT now()").fetchone()
        except BaseException:
            conn.close()
            raise
        # rows written after this (by the database's clock) may be of objects created behind the
        # listing's back: a later listing judges them
        self._started: datetime = row[0] if row else datetime.max

    @property
    def uri_prefix(self) -> str:
        return self._prefix

    @property
    def complete(self) -> bool:
        """The listing passed through `record` to its end, and all of it was recorded."""
        return self._complete and not self._failed

    def record(self, refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
        batch: list[tuple[str, str]] = []
        for ref in refs:
            batch.append((_without_nul(ref.uri), _without_nul(ref.etag or "")))
            if len(batch) >= LISTED_PER_COPY:
                self._copy(batch)
                batch = []
            yield ref
        self._copy(batch)
        self._complete = True

    def finish(self) -> ListingMarks | None:
        """Mark what a complete listing no longer holds, and bring back what it holds again; None
        (nothing marked) when the listing did not complete."""
        if not self.complete:
            return None
        params = {"pattern": like_prefix(self._prefix), "started": self._started}
        with self._conn.transaction():
            # the join of millions of listed keys hashes in memory instead of in many batches on disk
            self._conn.execute("SET LOCAL work_mem = '64MB'")
            # probing the listing by uri stays cheap whatever the planner thinks of the records' marks
            # (their statistics lag: rows marked a moment ago in this transaction look like none)
            self._conn.execute(f"CREATE INDEX ON {_LISTED} (uri)")
            self._conn.execute(f"ANALYZE {_LISTED}")  # autovacuum never analyzes temporary tables
            counts = {
                name: self._conn.execute(statement, params).rowcount for name, statement in _mark_sql(self._table)
            }
        return ListingMarks(**counts)

    def close(self) -> None:
        """Close the connection; the temporary table goes with it."""
        self._conn.close()

    def _copy(self, batch: list[tuple[str, str]]) -> None:
        if not batch or self._failed:
            return
        try:
            # autocommit: each COPY is a short transaction of its own
            with self._conn.cursor() as cur, cur.copy(f"COPY {_LISTED} (uri, etag) FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)
        except psycopg.Error as exc:
            self._failed = True
            log.warning("recording the listing of %s failed, so it marks nothing: %s", self._prefix, exc)
            return
        self.listed += len(batch)


# one per connection: each listing has a connection of its own
_LISTED = "imagemill_listed"


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (escape character `\\`) matching the strings that start with `prefix`."""
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


def _mark_sql(table: str) -> list[tuple[str, sql.Composed]]:
    """(`ListingMarks` field, UPDATE) in the order they run: bringing rows back first, so that those
    marked a moment later are not searched again."""
    name = sql.Identifier(table)
    listed = sql.Identifier(_LISTED)
    under = sql.SQL("r.uri LIKE %(pattern)s ESCAPE '\\'")
    statements = {
        # an object deleted before and listed again
        "reappeared": "UPDATE {t} AS r SET deleted_at = NULL WHERE r.deleted_at IS NOT NULL AND {under}"
        " AND EXISTS (SELECT 1 FROM {listed} AS l WHERE l.uri = r.uri)",
        # an object that went back to a version seen before
        "restored": "UPDATE {t} AS r SET superseded_at = NULL FROM {listed} AS l WHERE r.uri = l.uri"
        " AND r.etag = l.etag AND r.superseded_at IS NOT NULL",
        # rows under the prefix whose uri the listing did not list
        "deleted": "UPDATE {t} AS r SET deleted_at = now() WHERE {under} AND r.deleted_at IS NULL"
        " AND r.written_at < %(started)s AND NOT EXISTS (SELECT 1 FROM {listed} AS l WHERE l.uri = r.uri)",
        # rows of a version the listing no longer shows (a listing without an etag says nothing)
        "superseded": "UPDATE {t} AS r SET superseded_at = now() FROM {listed} AS l WHERE r.uri = l.uri"
        " AND l.etag <> '' AND r.etag <> l.etag AND r.superseded_at IS NULL AND r.written_at < %(started)s",
    }
    return [(key, sql.SQL(text).format(t=name, listed=listed, under=under)) for key, text in statements.items()]


def _event_sql(
    table: str, created: Sequence[ObjectChange], removed: Sequence[ObjectChange]
) -> list[tuple[str, sql.Composed, list[ObjectChange]]]:
    """(`ListingMarks` field, UPDATE, its (uri, etag, event time) rows) for upload events, in the
    order they run: bringing rows back first, as a listing does."""
    events = sql.SQL("unnest(%s::text[], %s::text[], %s::timestamptz[]) AS e(uri, etag, at)")
    statements = {
        # an object deleted before it was created again (any etag: its other rows are superseded next)
        "reappeared": "UPDATE {t} AS r SET deleted_at = NULL FROM {events} WHERE r.uri = e.uri AND r.deleted_at < e.at",
        # an object created again with the content of a version it had before it was replaced
        "restored": "UPDATE {t} AS r SET superseded_at = NULL FROM {events} WHERE r.uri = e.uri AND r.etag = e.etag"
        " AND r.superseded_at < e.at",
        # rows of the version the created one replaced (an event without an etag says nothing)
        "superseded": "UPDATE {t} AS r SET superseded_at = e.at FROM {events} WHERE r.uri = e.uri AND e.etag <> ''"
        " AND r.etag <> e.etag AND r.superseded_at IS NULL AND r.written_at < e.at",
        "deleted": "UPDATE {t} AS r SET deleted_at = e.at FROM {events} WHERE r.uri = e.uri"
        " AND r.deleted_at IS NULL AND r.written_at < e.at",
    }
    rows = {"reappeared": created, "restored": created, "superseded": created, "deleted": removed}
    return [
        (name, sql.SQL(text).format(t=sql.Identifier(table), events=events), list(rows[name]))
        for name, text in statements.items()
        if rows[name]
    ]


def _ensure_schema(conn: psycopg.Connection[Any], table: str, where: str) -> None:
    """Create the tables once, whichever of several starting workers gets there first; bring a
    table of an older schema version up to this one."""
    with conn.transaction():
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin (duplicate pg_type row)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS imagemill_meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(
            "INSERT INTO imagemill_meta (key, value) VALUES ('schema_version', %s) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute("SELECT value FROM imagemill_meta WHERE key = 'schema_version'").fetchone()
        value = row[0] if row else None
        if value in ("1", "2"):
            # the version is the database's: from now on older imagemills refuse it (they would not
            # keep the view's columns right). Each older table is migrated when it is first opened.
            conn.execute("UPDATE imagemill_meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            value = str(SCHEMA_VERSION)
        _check_version(value, where)
        # skipping DDL when the table exists also skips CREATE INDEX, which would lock out writers
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
            for statement in _create_sql(table, embedding_type(conn)):
                conn.execute(statement)
        elif not _has_column(conn, table, "embedding"):
            log.warning("%s: migrating table %s to schema version %d", where, table, SCHEMA_VERSION)
            older = _migrate_v1_sql(table) if not _has_column(conn, table, "deleted_at") else []
            for statement in [*older, *_migrate_v2_sql(table, embedding_type(conn))]:
                conn.execute(statement)


def embedding_type(conn: psycopg.Connection[Any]) -> str:
    """The embedding column's type for a new table: pgvector's `vector` (no fixed dimension, so any
    tags model fits; an index needs one: see the README) when the extension is installed in this
    database, else `real[]`. Detected once, when the table is made or migrated."""
    installed = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    return "vector" if installed else "real[]"


def _has_column(conn: psycopg.Connection[Any], table: str, column: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
        (table, column),
    ).fetchone()
    return row is not None


def _check_version(value: str | None, where: str) -> None:
    if value is not None and value.isdigit() and int(value) == SCHEMA_VERSION:
        return
    if value is not None and value.isdigit() and int(value) > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: database schema version {value} is newer than this imagemill knows"
            f" ({SCHEMA_VERSION}); upgrade imagemill"
        )
    raise SchemaVersionError(f"{where}: imagemill_meta has schema_version {value!r}, expected {SCHEMA_VERSION}")


def _create_sql(table: str, embedding: str) -> list[sql.Composed]:
    name = sql.Identifier(table)
    create = sql.SQL(
        "CREATE TABLE {} ("
        " uri text NOT NULL,"
        " etag text NOT NULL,"  # '' when the listing had none: primary key columns cannot be NULL
        " signature text NOT NULL,"
        " job_id text,"
        " flagged boolean,"  # NULL when moderation was not run
        " caption text,"
        " error_kind text,"
        " processed_at timestamptz NOT NULL,"
        " record jsonb NOT NULL,"
        " written_at timestamptz NOT NULL DEFAULT now(),"  # the database's clock, unlike processed_at
        " superseded_at timestamptz,"  # a later listing found another etag at this uri
        " deleted_at timestamptz,"  # a later complete listing of a prefix did not list this uri
        " embedding {},"  # the record's embedding vector, when it has one (also in record, as base64)
        " PRIMARY KEY (uri, etag, signature))"
    ).format(name, sql.SQL(_EMBEDDING_TYPES[embedding]))
    index = sql.SQL("CREATE INDEX {} ON {} ({})")
    return (
        [create]
        + [
            index.format(sql.Identifier(f"{table}_{column}_idx"), name, sql.Identifier(column))
            for column in ("job_id", "error_kind", "flagged")
        ]
        + _current_sql(table)
    )


def _migrate_v1_sql(table: str) -> list[sql.Composed]:
    """Version 1 -> 2 in place (the view comes with version 3's column). Adding the columns rewrites
    nothing (constant defaults); the two new indexes are built under the schema lock, so writers
    wait once for them."""
    name = sql.Identifier(table)
    return [
        sql.SQL(
            "ALTER TABLE {}"
            # rows from before the migration count as written before any listing started
            " ADD COLUMN written_at timestamptz NOT NULL DEFAULT '-infinity',"
            " ADD COLUMN superseded_at timestamptz,"
            " ADD COLUMN deleted_at timestamptz"
        ).format(name),
        sql.SQL("ALTER TABLE {} ALTER COLUMN written_at SET DEFAULT now()").format(name),
        *_listing_index_sql(table),
    ]


def _migrate_v2_sql(table: str, embedding: str) -> list[sql.Composed]:
    """Version 2 -> 3 in place: a column without a default (no rewrite), then the view that shows it."""
    add = sql.SQL("ALTER TABLE {} ADD COLUMN embedding {}").format(
        sql.Identifier(table), sql.SQL(_EMBEDDING_TYPES[embedding])
    )
    return [add, _view_sql(table)]


# the SQL of each type `embedding_type` names (constants: never text from outside)
_EMBEDDING_TYPES = {"real[]": "real[]", "vector": "vector"}


def _current_sql(table: str) -> list[sql.Composed]:
    """The indexes that listings mark by, and the view of current records."""
    return [*_listing_index_sql(table), _view_sql(table)]


def _listing_index_sql(table: str) -> list[sql.Composed]:
    name = sql.Identifier(table)
    return [
        # `uri LIKE 'prefix%'` can use a btree index only in the C collation or with pattern ops
        sql.SQL("CREATE INDEX {} ON {} (uri text_pattern_ops)").format(sql.Identifier(f"{table}_uri_prefix_idx"), name),
        # the few rows out of the view: a listing finds those to bring back without a table scan
        sql.SQL("CREATE INDEX {} ON {} (uri, etag) WHERE deleted_at IS NOT NULL OR superseded_at IS NOT NULL").format(
            sql.Identifier(f"{table}_history_idx"), name
        ),
    ]


def current_condition(table: str, alias: str = "r") -> sql.Composed:
    """The condition the view of current records puts on a row `alias` of `table`: neither deleted
    nor superseded, and no newer such row of its uri. The view is made from it; a query that needs a
    column the view leaves out (the review queue's state) puts it on the table itself."""
    return sql.SQL(
        "{r}.deleted_at IS NULL AND {r}.superseded_at IS NULL AND NOT EXISTS ("
        " SELECT 1 FROM {table} AS n WHERE n.uri = {r}.uri AND n.deleted_at IS NULL AND n.superseded_at IS NULL"
        " AND (n.processed_at, n.etag, n.signature) > ({r}.processed_at, {r}.etag, {r}.signature))"
    ).format(r=sql.Identifier(alias), table=sql.Identifier(table))


def _view_sql(table: str) -> sql.Composed:
    # NOT EXISTS rather than DISTINCT ON: a filter on the view (`WHERE flagged`, `WHERE uri = …`,
    # `WHERE job_id = …`) is applied to the table first and can use its indexes; each candidate is
    # then checked against the other rows of its uri through the primary key
    columns = sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in _ALL_COLUMNS)
    return sql.SQL("CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM {table} AS r WHERE {current}").format(
        view=sql.Identifier(current_view(table)),
        columns=columns,
        table=sql.Identifier(table),
        current=current_condition(table),
    )


_COLUMNS = (
    "uri", "etag", "signature", "job_id", "flagged", "caption", "error_kind", "processed_at", "record", "embedding"
)  # fmt: skip
# the view's columns: added ones go last (CREATE OR REPLACE VIEW can only append)
_ALL_COLUMNS = (*_COLUMNS[:-1], "written_at", "superseded_at", "deleted_at", "embedding")


def _upsert_sql(table: str) -> sql.Composed:
    # deleted_at and superseded_at are left as they are: only a listing says what exists now
    keys = ("uri", "etag", "signature")
    updates: list[sql.Composable] = [
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in _COLUMNS if c not in keys
    ]
    updates.append(sql.SQL("written_at = now()"))
    return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (uri, etag, signature) DO UPDATE SET {}").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
        sql.SQL(", ").join(updates),
    )


def _row(record: Record) -> tuple[Any, ...]:
    return (
        *_stored_key(record.key),
        record.job_id,
        record.moderation.flagged if record.moderation else None,
        _without_nul(record.caption.text) if record.caption else None,
        str(record.error.kind) if record.error else None,
        record.processed_at,
        Jsonb(_without_nul(record.model_dump(mode="json"))),
        # a list of floats is sent as float8[]: assigned to real[] (or to pgvector's vector) by the server
        record.embedding.array().tolist() if record.embedding else None,
    )


def _without_nul(value: Any) -> Any:
    # PostgreSQL text and jsonb refuse U+0000; a model or a key that emits one must not fail a chunk forever
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {key: _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def _stored_key(key: Key) -> tuple[str, str, str]:
    uri, etag, signature = key
    return (uri, etag or "", signature)


def _where_job(query: sql.Composed, job_id: str | None) -> tuple[sql.Composed, tuple[Any, ...]]:
    if job_id is None:
        return query, ()
    return sql.SQL("{} WHERE job_id = %s").format(query), (job_id,)


# -- the review queue's part of the table ---------------------------------------------------------
# `review_state` is the review queue's own column (NULL: a person has yet to decide; `decided`,
# `second` (awaiting a second look), `escalated`), written only by imagemill.review.store in the
# transaction of each decision; the upsert leaves it alone. Its partial indexes below hold only the
# undecided rows, so a claim walks a page of them whatever has been decided. The queue's queries must
# spell each expression and condition exactly as the indexes do, or the planner cannot use them.
REVIEW_STATE = "review_state"
# the rows that can be in the queue at all: no error, not deleted, not replaced
REVIEW_LIVE = "{r}error_kind IS NULL AND {r}deleted_at IS NULL AND {r}superseded_at IS NULL"
REVIEW_OPEN = "{r}review_state IS NULL"


def label_score(label: str, alias: str | None = "r") -> sql.Composed:
    """A moderation label's score in a row (0 where the record has none)."""
    record = sql.SQL("{}.record").format(sql.Identifier(alias)) if alias else sql.SQL("record")
    return sql.SQL("coalesce(({} -> 'moderation' -> 'scores' ->> {})::float8, 0)").format(record, sql.Literal(label))


def review_score(labels: Sequence[str], alias: str | None = "r") -> sql.Composed:
    """The queue's sort score: the highest score among the labels that have a threshold."""
    return sql.SQL("greatest({})").format(sql.SQL(", ").join(label_score(label, alias) for label in labels))


def review_condition(text: str, alias: str | None = "r") -> sql.SQL:
    """REVIEW_LIVE or REVIEW_OPEN for a row alias."""
    return sql.SQL(text.format(r=f"{alias}." if alias else ""))


def review_index_sql(
    table: str, labels: Sequence[str], audit_below: int, conn: psycopg.Connection[Any]
) -> list[tuple[str, sql.Composed]]:
    """(name, CREATE INDEX) of the review queue's indexes: the flagged rows a person has yet to decide
    by score (within a job too), by age and, with several thresholded labels, by each label's score;
    the audit sample's (unflagged rows whose uri hash is under `audit_below`) by score and by age; the
    decided rows by state (the leads' queue, the second looks, the recount). Each name ends in a hash
    of its definition, so a change of labels or audit rate makes new indexes instead of misusing old ones."""
    records = sql.Identifier(table)
    live, undecided = review_condition(REVIEW_LIVE, None), review_condition(REVIEW_OPEN, None)
    score = review_score(labels, None)
    queued = sql.SQL("flagged AND {} AND {}").format(undecided, live)
    audit = sql.SQL(AUDIT_HASH.format(uri="uri"))
    bodies: list[tuple[str, sql.Composable, sql.Composable]] = [
        ("s", sql.SQL("{} DESC, uri, etag").format(score), queued),
        ("j", sql.SQL("job_id, {} DESC, uri, etag").format(score), queued),
        ("a", sql.SQL("written_at, uri, etag"), queued),
        ("w", sql.SQL("review_state, uri, etag"), sql.SQL("review_state IS NOT NULL AND {}").format(live)),
    ]
    if len(labels) > 1:
        bodies += [("l", sql.SQL("{} DESC, uri, etag").format(label_score(label, None)), queued) for label in labels]
    if audit_below > 0:
        sample = sql.SQL("flagged IS FALSE AND {} AND {} AND {} < {}").format(
            undecided, live, audit, sql.Literal(audit_below)
        )
        bodies.append(("u", sql.SQL("{} DESC, uri, etag").format(score), sample))
        bodies.append(("v", sql.SQL("written_at, uri, etag"), sample))
    made = []
    for kind, columns, where in bodies:
        definition = sql.SQL("ON {} ({}) WHERE {}").format(records, columns, where)
        digest = hashlib.md5(definition.as_string(conn).encode(), usedforsecurity=False).hexdigest()[:10]
        name = f"{table}_r{kind}{digest}"
        made.append((name, sql.SQL("CREATE INDEX {} {}").format(sql.Identifier(name), definition)))
    return made


def _reason(exc: Exception, url: str) -> str:
    # the driver's message may quote the whole URL, password included
    return " ".join(scrub_secret(str(exc), url).split())
