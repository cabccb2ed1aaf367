"""The review app's PostgreSQL connections: a few autocommit connections shared by its request threads.

The queue (`store`), the sessions and login limits (`sessions`) all take their connections here.
"""

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from imagemill.core.sinks.postgres import connect

# what a request meets while the database is away: the app answers 503 for these
DATABASE_DOWN = (psycopg.OperationalError, psycopg.InterfaceError)


class Pool:
    """A few autocommit connections for the app's request threads: taken one per call, returned
    after; a broken connection is dropped, never handed out again."""

    def __init__(self, conninfo: str, url: str, idle: int = 8) -> None:
        self._conninfo = conninfo
        self._url = url
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue(maxsize=idle)
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._take()
        try:
            yield conn
        except DATABASE_DOWN:
            conn.close()
            raise
        if conn.broken or conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def _take(self) -> psycopg.Connection[Any]:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not (conn.closed or conn.broken):
                return conn
        conn = connect(self._conninfo, self._url, application_name="imagemill-review")
        # the queue's queries look costly to the planner (subqueries, jsonb) but touch a page of
        # rows: JIT-compiling them, or starting parallel workers for them, costs more than running them
        conn.execute("SET jit = off")
        conn.execute("SET max_parallel_workers_per_gather = 0")
        return conn

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
