"""PostgreSQL results store: one upserted row per record key (uri, etag, signature), one transaction per chunk.

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
"""

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from imagemill.core.closing import Closing
from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url, scrub_secret
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.stores.base import Key, ListingMarks, WriterContext
from imagemill.core.stores.options import split_options

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


class PostgresStore(WriterContext):
    """A RecordWriter on PostgreSQL. One connection, opened on first use and reopened after it breaks;
    not for sharing between threads (open one store per thread or process). `with` closes it."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conninfo, self._table = split_table(url)
        self._check_parses()
        self._conn: psycopg.Connection[Any] | None = None
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
        wanted = list(dict.fromkeys(keys))
        found: set[Key] = set()
        for start in range(0, len(wanted), KEYS_PER_QUERY):
            batch = wanted[start : start + KEYS_PER_QUERY]
            stored = self._stored_ok_keys(batch)
            found.update(key for key in batch if _stored_key(key) in stored)
        return found

    def listing(self, uri_prefix: str) -> "PostgresListing":
        """Follow a listing of everything under `uri_prefix` on a connection of its own (`MarksDeleted`)."""
        return PostgresListing(self._connect(), self._table, uri_prefix)

    def failed_records(self, job_id: str) -> list[Record]:
        """The job's records that carry an error (for `imagemill retry`)."""
        query = sql.SQL("SELECT record FROM {} WHERE job_id = %s AND error_kind IS NOT NULL ORDER BY uri").format(
            sql.Identifier(self._table)
        )
        with self._session() as conn:
            return [Record.model_validate(row[0]) for row in conn.execute(query, (job_id,)).fetchall()]

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
        try:
            # autocommit, so that every `conn.transaction()` is a real BEGIN/COMMIT, never a savepoint
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._defaults())
        except psycopg.OperationalError as exc:
            # transient for a worker (Celery retries); `check` turns it into a message for a person
            raise psycopg.OperationalError(scrub_secret(str(exc), self._url)) from None
        try:
            _ensure_schema(conn, self._table, redact_url(self._url))
        except BaseException:
            conn.close()
            raise
        return conn

    def _defaults(self) -> dict[str, Any]:
        # without a timeout libpq waits for the kernel (minutes) on an unreachable host
        given = conninfo_to_dict(self._conninfo)
        defaults = {"connect_timeout": 10, "application_name": "imagemill"}
        return {key: value for key, value in defaults.items() if key not in given}

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


def _view_sql(table: str) -> sql.Composed:
    # NOT EXISTS rather than DISTINCT ON: a filter on the view (`WHERE flagged`, `WHERE uri = …`,
    # `WHERE job_id = …`) is applied to the table first and can use its indexes; each candidate is
    # then checked against the other rows of its uri through the primary key
    columns = sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in _ALL_COLUMNS)
    return sql.SQL(
        "CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM {table} AS r"
        " WHERE r.deleted_at IS NULL AND r.superseded_at IS NULL AND NOT EXISTS ("
        " SELECT 1 FROM {table} AS n WHERE n.uri = r.uri AND n.deleted_at IS NULL AND n.superseded_at IS NULL"
        " AND (n.processed_at, n.etag, n.signature) > (r.processed_at, r.etag, r.signature))"
    ).format(view=sql.Identifier(current_view(table)), columns=columns, table=sql.Identifier(table))


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
