"""PostgreSQL results store: one upserted row per record key (uri, etag, signature), one transaction per chunk.

Owns the records table (`imagemill_records`, or `?table=`), the `imagemill_meta` schema version, and a connection.
"""

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url, scrub_secret
from imagemill.core.schemas import Record
from imagemill.core.stores.base import Key, WriterContext
from imagemill.core.stores.options import split_options

SCHEMA_VERSION = 1
DEFAULT_TABLE = "imagemill_records"
KEYS_PER_QUERY = 1000
# any constant works as long as every imagemill process uses the same one ("imgmill" in ASCII)
_SCHEMA_LOCK = 0x696D676D696C6C
# lowercase so people can query it unquoted; short so "<table>_job_id_idx" stays within 63 bytes
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")


class SchemaVersionError(UserError):
    """The database was set up by a newer imagemill than this one."""


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


def _ensure_schema(conn: psycopg.Connection[Any], table: str, where: str) -> None:
    """Create the tables once, whichever of several starting workers gets there first."""
    with conn.transaction():
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin (duplicate pg_type row)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS imagemill_meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(
            "INSERT INTO imagemill_meta (key, value) VALUES ('schema_version', %s) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute("SELECT value FROM imagemill_meta WHERE key = 'schema_version'").fetchone()
        _check_version(row[0] if row else None, where)
        # skipping DDL when the table exists also skips CREATE INDEX, which would lock out writers
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
            for statement in _create_sql(table):
                conn.execute(statement)


def _check_version(value: str | None, where: str) -> None:
    if value is not None and value.isdigit() and int(value) == SCHEMA_VERSION:
        return
    if value is not None and value.isdigit() and int(value) > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: database schema version {value} is newer than this imagemill knows"
            f" ({SCHEMA_VERSION}); upgrade imagemill"
        )
    raise SchemaVersionError(f"{where}: imagemill_meta has schema_version {value!r}, expected {SCHEMA_VERSION}")


def _create_sql(table: str) -> list[sql.Composed]:
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
        " PRIMARY KEY (uri, etag, signature))"
    ).format(name)
    index = sql.SQL("CREATE INDEX {} ON {} ({})")
    return [create] + [
        index.format(sql.Identifier(f"{table}_{column}_idx"), name, sql.Identifier(column))
        for column in ("job_id", "error_kind", "flagged")
    ]


_COLUMNS = ("uri", "etag", "signature", "job_id", "flagged", "caption", "error_kind", "processed_at", "record")


def _upsert_sql(table: str) -> sql.Composed:
    keys = ("uri", "etag", "signature")
    updates = [sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in _COLUMNS if c not in keys]
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
