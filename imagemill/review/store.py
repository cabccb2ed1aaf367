"""The review queue in PostgreSQL: what is left to decide, who holds what, the decisions and their counts.

Reads the records table through its view of the current records (one row per uri, the object as it
is now: a replaced or deleted object's rows never queue, and decisions on them are stale), and keeps
the item's queue state in the table's `review_state` column (the sink makes it and the partial
indexes over it), set in the transaction of every decision. Owns its own tables:

- `imagemill_review_claims` (uri, etag, reviewer, expires_at): an item handed to a reviewer is theirs
  until `expires_at`; the primary key and a conditional upsert make two claims on one item
  impossible, whatever the timing. The page renews its claims while it is in use.
- `imagemill_reviews`: append-only decisions (uri, etag, decision, reviewer, role, note, reason,
  rule, override, second_look, decided_at). Per (uri, etag) the latest first-look row is the standing
  decision (an `undo` row takes it back); a second look is recorded beside it, never over it.
- `imagemill_review_tally` and `_tally_delta`: the counts the page shows. A recount in one snapshot
  writes the base and deletes exactly the deltas it saw; each decision adds its delta in its own
  transaction, so counts are exact for decisions at once and catch up on new records at the next
  recount (`counts_refresh_s`).

The queue: current records without an error, flagged (below the auto-reject bands) or in the audit
sample of unflagged ones (the uri's md5 under the audit rate), without a standing decision, plus the
decisions sampled for a second look (never shown to their first reviewer); escalated items form the
leads' queue. Sorted by score (the highest thresholded label's, default) or by age, a keyset cursor
(`after`) for the next page.
"""

import base64
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import IsolationLevel, sql
from psycopg.rows import dict_row

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.sinks.postgres import (
    AUDIT_HASH,
    REVIEW_LIVE,
    REVIEW_OPEN,
    PostgresSink,
    current_condition,
    current_view,
    label_score,
    review_condition,
    review_score,
    split_table,
)
from imagemill.review.db import Pool
from imagemill.review.settings import AUTO, Reviewer, Role

CLAIMS = "imagemill_review_claims"
REVIEWS = "imagemill_reviews"
TALLY = "imagemill_review_tally"
TALLY_DELTA = "imagemill_review_tally_delta"
META = "imagemill_review_meta"
# the review's own tables' layout: 2 added roles, overrides, second looks, reasons, rules and the tally
SCHEMA = "2"
# "imgrevw" in ASCII; not the records store's lock, so the two never wait on each other
_SCHEMA_LOCK = 0x696D6772657677
_RECOUNT_LOCK = _SCHEMA_LOCK + 1
AUDIT_SPACE = 2**32  # the audit sample's hash (`AUDIT_HASH`, the sink's, as its index) is below this
# the second-look sample's hash: the next 32 bits of the same md5, so it is independent of the audit's
SECOND_HASH = "(('x' || substr(md5({uri}), 9, 8))::bit(32)::bigint)"
CLAIM_ROUNDS = 4
# a filtered queue is counted up to this many, then shown as "500+": an exact count at a million
# rows would cost seconds, and nobody plans a shift by the thousand-and-first item
COUNT_CAP = 500
SWEEP_BATCH = 500
# one lock per item (uri, etag) for every decision, undo and auto-decision on it
_ITEM_LOCK = "hashtextextended({uri} || ' ' || {etag}, 0)"


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    ESCALATE = "escalate"


class State(StrEnum):
    """An item's `review_state` (NULL: open, a person has yet to decide)."""

    DECIDED = "decided"
    SECOND = "second"  # decided, and sampled for a second look by another reviewer
    ESCALATED = "escalated"  # in the leads' queue


class Sort(StrEnum):
    SCORE = "score"  # the highest thresholded label's score (the label's, under a label filter), highest first
    AGE = "age"  # when the record was stored, oldest first


class Queue(StrEnum):
    PEOPLE = "people"
    LEADS = "leads"


UNDO = "undo"
# what a decision is called on the object and in exports
OUTCOME = {Decision.APPROVE: "approved", Decision.REJECT: "rejected", Decision.ESCALATE: "escalated"}


class NotFound(Exception):
    """No current record has this (uri, etag), or there is nothing to undo."""


class HeldByAnother(Exception):
    """Another reviewer holds a live claim on the item."""

    def __init__(self, reviewer: str) -> None:
        super().__init__(f"claimed by another reviewer until the lease ends ({reviewer})")
        self.reviewer = reviewer


class Conflict(Exception):
    """The item has another reviewer's standing decision: only a lead's override changes it."""

    def __init__(self, standing: "Stored") -> None:
        super().__init__(f"{standing.reviewer} decided this item already ({standing.decision})")
        self.standing = standing


class NotLead(Exception):
    """Something only a lead may do: override, work the leads' queue."""


@dataclass(frozen=True)
class Filters:
    """What a reviewer narrowed the queue to; each None means any."""

    job_id: str | None = None
    label: str | None = None  # a thresholded label: items where it crossed; sorted and ranged by its score
    min_score: float | None = None  # without a label, on the sort score (the highest thresholded label's)
    max_score: float | None = None

    @property
    def any(self) -> bool:
        return any(value is not None for value in (self.job_id, self.label, self.min_score, self.max_score))


@dataclass(frozen=True)
class Label:
    """A thresholded label's score on an item and the threshold it was compared to."""

    label: str
    score: float
    threshold: float

    @property
    def crossed(self) -> bool:
        return self.score >= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "threshold": self.threshold, "crossed": self.crossed}


@dataclass(frozen=True)
class Item:
    uri: str
    etag: str
    job_id: str | None
    flagged: bool
    reason: str  # flagged, audit (the unflagged sample), second-look, escalated
    caption: str | None
    scores: dict[str, float]
    tags: list[dict[str, Any]]
    labels: list[Label]  # every thresholded label, highest score first
    key: float | datetime = 0.0  # the sort key: the score it is sorted by, or when it was stored
    cursor: str = ""  # where the next page starts, after this item
    claimed_until: datetime | None = None

    def other_scores(self, count: int = 3) -> list[tuple[str, float]]:
        """The highest scores of the labels without a threshold."""
        thresholded = {label.label for label in self.labels}
        others = [(name, score) for name, score in self.scores.items() if name not in thresholded]
        return sorted(others, key=lambda pair: (-pair[1], pair[0]))[:count]


@dataclass(frozen=True)
class Stored:
    """One row of `imagemill_reviews`."""

    id: int
    uri: str
    etag: str
    decision: str
    reviewer: str
    role: str
    note: str | None
    reason: str | None
    rule: str | None
    override: bool
    second_look: bool
    decided_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "uri": self.uri,
            "etag": self.etag,
            "decision": self.decision,
            "reviewer": self.reviewer,
            "role": self.role,
            "note": self.note,
            "reason": self.reason,
            "rule": self.rule,
            "override": self.override,
            "second_look": self.second_look,
            "decided_at": self.decided_at.isoformat(),
        }


_STORED = "id, uri, etag, decision, reviewer, role, note, reason, rule, override, second_look, decided_at"


@dataclass
class Counts:
    left: int  # open items (under the filters: counted up to COUNT_CAP)
    done: int  # current items with a standing approve or reject
    mine: int  # current items whose standing decision is the reviewer's
    second_looks: int  # decided items awaiting a second look
    escalated: int  # items in the leads' queue
    left_capped: bool = False  # `left` is COUNT_CAP and there are more

    def as_dict(self) -> dict[str, Any]:
        return {
            "left": self.left,
            "left_capped": self.left_capped,
            "done": self.done,
            "mine": self.mine,
            "second_looks": self.second_looks,
            "escalated": self.escalated,
        }


@dataclass
class Claimed:
    items: list[Item]
    expired: int = 0  # leases that had run out, found and cleared while claiming
    next_after: str | None = field(default=None)


@dataclass(frozen=True)
class Renewed:
    renewed: dict[tuple[str, str], datetime]  # (uri, etag) -> new end of the lease
    lost: list[tuple[str, str]]  # no longer the reviewer's (expired, taken, decided or released)


@dataclass(frozen=True)
class ReviewerStats:
    reviewer: str
    standing: int  # current items whose standing decision is theirs
    last_hour: int  # decisions (not undos) in the last hour
    total: int  # decisions ever (not undos)
    overrides: int
    second_looks: int


@dataclass(frozen=True)
class Agreement:
    """Second looks that agree with the decision they looked again at, by who made that one."""

    first: str  # "auto" or "people"
    pairs: int
    agreed: int

    @property
    def rate(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


@dataclass(frozen=True)
class Bands:
    """What decides where an item goes: the moderation thresholds (label -> score), the auto-reject
    floors (label -> score), the audit sample's rate, and the second-look samples' rates."""

    thresholds: Mapping[str, float]
    auto_reject: Mapping[str, float] = field(default_factory=dict)
    audit_rate: float = 0.01
    auto_audit_rate: float = 0.05
    second_look_rate: float = 0.02


def audit_threshold(rate: float) -> int:
    """Uris whose hash is below this are in the sample."""
    return min(int(rate * AUDIT_SPACE), AUDIT_SPACE)


def audit_hash(uri: str) -> int:
    """`AUDIT_HASH` of a uri, as SQL computes it."""
    return int(hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()[:8], 16)


def second_hash(uri: str) -> int:
    """`SECOND_HASH` of a uri, as SQL computes it."""
    return int(hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()[8:16], 16)


def encode_cursor(key: float | datetime, uri: str, etag: str) -> str:
    value: Any = key.isoformat() if isinstance(key, datetime) else key
    return base64.urlsafe_b64encode(json.dumps([value, uri, etag]).encode()).decode().rstrip("=")


def decode_cursor(text: str, sort: Sort) -> tuple[Any, str, str]:
    """(sort key, uri, etag) of an `after` cursor; ValueError when it is not one of ours."""
    try:
        key, uri, etag = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError) as exc:
        raise ValueError("after is not a cursor this queue gave") from exc
    if not (isinstance(uri, str) and isinstance(etag, str)):
        raise ValueError("after is not a cursor this queue gave")
    if sort is Sort.AGE:
        if not isinstance(key, str):
            raise ValueError("after is a cursor of another sort order")
        return datetime.fromisoformat(key), uri, etag
    if not isinstance(key, int | float) or isinstance(key, bool):
        raise ValueError("after is a cursor of another sort order")
    return float(key), uri, etag


def _contribution(state: str | None, eligible: bool, standing: str | None) -> Counter[str]:
    """What one current item adds to each count; the recount's definitions, item by item."""
    counts: Counter[str] = Counter()
    if state is None:
        counts["left"] += int(eligible)
        return counts
    if state in (State.DECIDED, State.SECOND):
        counts["done"] += 1
    if state == State.SECOND:
        counts["second"] += 1
    if state == State.ESCALATED:
        counts["escalated"] += 1
    if standing is not None:
        counts[f"mine:{standing}"] += 1
    return counts


class ReviewStore:
    """The queue, claims, decisions and counts over one records table (`postgresql://…[?table=]`)."""

    def __init__(self, url: str, bands: Bands, lease_s: int = 300) -> None:
        self._url = url
        self._records = PostgresSink(url)
        self._table = self._records.table
        self._t = sql.Identifier(self._table)
        self._view = sql.Identifier(current_view(self._table))
        self.bands = bands
        self.labels = tuple(sorted(bands.thresholds))
        self._audit_below = audit_threshold(bands.audit_rate)
        self.lease_s = lease_s
        conninfo, _ = split_table(url)
        self.pool = Pool(conninfo, url)

    @property
    def table(self) -> str:
        return self._table

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self, queue: bool = True) -> None:
        """Connect, create the records table and (with `queue`) the queue's column and indexes on it
        (the sink's own code) and the review tables; bring decisions made before the queue kept
        `review_state` into it; UserError in one line when the database cannot be reached."""
        try:
            self._records.check()
            if queue:
                self._records.add_review_indexes(self.labels, self._audit_below)
            self._records.close()
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _schema():
                    conn.execute(statement)
                row = conn.execute(f"SELECT value FROM {META} WHERE key = 'schema'").fetchone()
                if queue and (row is None or row[0] != SCHEMA):
                    self._backfill(conn)
                    conn.execute(
                        f"INSERT INTO {META} (key, value) VALUES ('schema', %s)"
                        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        (SCHEMA,),
                    )
            conn.execute(f"ANALYZE {CLAIMS}, {REVIEWS}")
        except psycopg.OperationalError as exc:
            raise UserError(f"cannot connect to {redact_url(self._url)}: {exc}") from None

    def _backfill(self, conn: psycopg.Connection[Any]) -> None:
        # decisions of an earlier imagemill, made before `review_state` existed: their items leave the queue
        conn.execute(
            sql.SQL(
                "UPDATE {t} AS r SET review_state = CASE d.decision WHEN 'escalate' THEN 'escalated' ELSE 'decided' END"
                " FROM (SELECT DISTINCT ON (uri, etag) uri, etag, decision FROM {reviews} WHERE NOT second_look"
                " ORDER BY uri, etag, id DESC) AS d"
                " WHERE r.uri = d.uri AND r.etag = d.etag AND d.decision <> 'undo' AND r.review_state IS NULL"
            ).format(t=self._t, reviews=sql.Identifier(REVIEWS))
        )

    def close(self) -> None:
        self.pool.close()

    def ping(self) -> None:
        """A round trip to the database (psycopg.Error when it is away)."""
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")

    # -- SQL pieces -----------------------------------------------------------------------------

    def _key(self, label: str | None = None) -> sql.Composed:
        """The sort score: a label's (under a label filter, when there are several), else the
        highest thresholded label's; spelled as the sink's indexes spell it."""
        if label is None or len(self.labels) == 1:
            return review_score(self.labels)
        return label_score(label)

    def _outside_bands(self) -> list[sql.Composable]:
        return [
            sql.SQL("{} < {}").format(self._key(label), sql.Literal(floor))
            for label, floor in sorted(self.bands.auto_reject.items())
        ]

    def _current(self) -> sql.Composed:
        # the row is its object's current record: the records view's own condition (the sink's), on
        # the table, whose `review_state` the view leaves out
        return current_condition(self._table, "r")

    def _undecided(self) -> sql.Composed:
        # the truth is the log: a row written after its item was decided (a new signature) has no state yet
        return sql.SQL(
            "coalesce((SELECT d.decision FROM {reviews} AS d WHERE d.uri = r.uri AND d.etag = r.etag"
            " AND NOT d.second_look ORDER BY d.id DESC LIMIT 1), 'undo') = 'undo'"
        ).format(reviews=sql.Identifier(REVIEWS))

    def _branches(self, queue: Queue, reviewer: str, filters: Filters) -> list["_Branch"]:
        """The conditions of each half of the queue on a record `r`, each walking an index of its own."""
        live = review_condition(REVIEW_LIVE)
        if queue is Queue.LEADS:
            return [_Branch([sql.SQL("r.review_state = 'escalated'"), live], undecided=False)]
        undecided = review_condition(REVIEW_OPEN)
        flagged: list[sql.Composable] = [sql.SQL("r.flagged"), undecided, live, *self._outside_bands()]
        second: list[sql.Composable] = [
            sql.SQL("r.review_state = 'second'"),
            live,
            # never back to the reviewer whose decision it is
            sql.SQL(
                "NOT EXISTS (SELECT 1 FROM {reviews} AS d WHERE d.uri = r.uri AND d.etag = r.etag"
                " AND d.reviewer = %(reviewer)s AND NOT d.second_look)"
            ).format(reviews=sql.Identifier(REVIEWS)),
        ]
        branches = [_Branch(flagged, undecided=True), _Branch(second, undecided=False)]
        if self._audit_below > 0 and filters.label is None:
            audit = sql.SQL(AUDIT_HASH.format(uri="r.uri"))
            sample: list[sql.Composable] = [
                sql.SQL("r.flagged IS FALSE"),
                undecided,
                live,
                sql.SQL("{} < {}").format(audit, sql.Literal(self._audit_below)),
            ]
            branches.append(_Branch(sample, undecided=True))
        return branches

    def _filtered(self, conditions: list[sql.Composable], filters: Filters, params: dict[str, Any]) -> None:
        key = self._key(filters.label)
        if filters.job_id is not None:
            conditions.append(sql.SQL("r.job_id = %(job_id)s"))
            params["job_id"] = filters.job_id
        if filters.label is not None:
            # the items where this label crossed its threshold (sorted and ranged by its score: `key`)
            conditions.append(sql.SQL("{} >= %(label_threshold)s").format(label_score(filters.label)))
            params["label_threshold"] = self.bands.thresholds[filters.label]
        if filters.min_score is not None:
            conditions.append(sql.SQL("{} >= %(min_score)s").format(key))
            params["min_score"] = filters.min_score
        if filters.max_score is not None:
            conditions.append(sql.SQL("{} <= %(max_score)s").format(key))
            params["max_score"] = filters.max_score

    # -- the queue -------------------------------------------------------------------------------

    def claim(
        self,
        reviewer: Reviewer,
        limit: int,
        filters: Filters = Filters(),
        after: str = "",
        sort: Sort = Sort.SCORE,
        queue: Queue = Queue.PEOPLE,
    ) -> Claimed:
        """Up to `limit` queued items after the cursor `after`, claimed for `reviewer` for the lease:
        the reviewer's own live claims come back (renewed), others' never do. ValueError for a cursor
        that is not one of ours; NotLead for the leads' queue of a reviewer."""
        if queue is Queue.LEADS and not reviewer.lead:
            raise NotLead("the leads' queue is for leads")
        position = decode_cursor(after, sort) if after else None
        expired = 0
        mine: dict[tuple[str, str], Item] = {}
        with self.pool.connection() as conn:
            with conn.transaction():
                expired = len(conn.execute(f"DELETE FROM {CLAIMS} WHERE expires_at <= now() RETURNING 1").fetchall())
            for _ in range(CLAIM_ROUNDS):
                wanted = limit - len(mine)
                if wanted <= 0:
                    break
                # `limit`, not `wanted`: what this claim took in earlier rounds comes first again and is
                # left out, and asking for only `wanted` would find nothing else after a lost race
                found = self._candidates(conn, reviewer.name, limit, filters, position, sort, queue)
                candidates = [item for item in found if (item.uri, item.etag) not in mine][:wanted]
                if not candidates:
                    break
                won = self._take(conn, reviewer.name, candidates)
                mine.update(
                    {
                        (item.uri, item.etag): _with_lease(item, won[(item.uri, item.etag)])
                        for item in candidates
                        if (item.uri, item.etag) in won
                    }
                )
                if len(won) == len(candidates):
                    break
        if sort is Sort.SCORE:
            items = sorted(mine.values(), key=lambda item: (-float(item.key), item.uri, item.etag))  # type: ignore[arg-type]
        else:
            items = sorted(mine.values(), key=lambda item: (item.key, item.uri, item.etag))
        return Claimed(items, expired, items[-1].cursor if len(items) == limit else None)

    def _candidates(
        self,
        conn: psycopg.Connection[Any],
        reviewer: str,
        limit: int,
        filters: Filters,
        position: tuple[Any, str, str] | None,
        sort: Sort,
        queue: Queue,
    ) -> list[Item]:
        query, params = self.candidate_query(reviewer, limit, filters, position, sort, queue)
        with conn.cursor(row_factory=dict_row) as cur:
            # under filters, never a prepared (generic) plan: the best plan depends on their values;
            # without, the plan is always the same walk down an index, and planning it (the table's
            # many partial indexes) would cost about as much as running it
            rows = cur.execute(query, params, prepare=not filters.any).fetchall()
        return [self._item(row) for row in rows]

    def candidate_query(
        self,
        reviewer: str,
        limit: int,
        filters: Filters = Filters(),
        position: tuple[Any, str, str] | None = None,
        sort: Sort = Sort.SCORE,
        queue: Queue = Queue.PEOPLE,
    ) -> tuple[sql.Composed, dict[str, Any]]:
        """The SQL that finds a claim's candidates, and its parameters (the benchmark explains it)."""
        # each half walks its own partial index in the sort order and stops at `limit`; the short
        # lists are merged (an OR of all would scan and sort)
        params: dict[str, Any] = {"reviewer": reviewer}
        # a number in the text, not a parameter: a generic plan would take LIMIT $1 for a tenth of the table
        top = sql.Literal(limit)
        key = self._key(filters.label) if sort is Sort.SCORE else sql.SQL("r.written_at")
        order = sql.SQL("{} DESC, r.uri, r.etag" if sort is Sort.SCORE else "{}, r.uri, r.etag").format(key)
        branches = []
        for branch in self._branches(queue, reviewer, filters):
            conditions = branch.conditions
            self._filtered(conditions, filters, params)
            if position is not None:
                params.update(after_key=position[0], after_uri=position[1], after_etag=position[2])
                if sort is Sort.SCORE:
                    conditions.append(
                        sql.SQL(
                            "{k} <= %(after_key)s"
                            " AND ({k} < %(after_key)s OR (r.uri, r.etag) > (%(after_uri)s, %(after_etag)s))"
                        ).format(k=key)
                    )
                else:
                    conditions.append(
                        sql.SQL("(r.written_at, r.uri, r.etag) > (%(after_key)s, %(after_uri)s, %(after_etag)s)")
                    )
            conditions += [
                self._current(),
                self._undecided() if branch.undecided else sql.SQL("true"),
                # others' live claims, read once into a hash (a hashed subplan): the walk passes every
                # item the other reviewers hold (they work the top of the queue too), and a probe of
                # the claims' key per item would cost three buffers each
                sql.SQL(
                    "(r.uri, r.etag) NOT IN (SELECT c.uri, c.etag FROM {claims} AS c"
                    " WHERE c.expires_at > now() AND c.reviewer <> %(reviewer)s)"
                ).format(claims=sql.Identifier(CLAIMS)),
            ]
            branches.append(
                sql.SQL(
                    "(SELECT r.uri, r.etag, r.job_id, r.flagged, r.caption, r.review_state, r.written_at, {key} AS k,"
                    " r.record -> 'moderation' -> 'scores' AS scores, r.record -> 'tags' -> 'labels' AS tags"
                    " FROM {t} AS r WHERE {where} ORDER BY {order} LIMIT {top})"
                ).format(key=key, t=self._t, where=sql.SQL(" AND ").join(conditions), order=order, top=top)
            )
        query = sql.SQL("SELECT * FROM ({}) AS q ORDER BY {} LIMIT {}").format(
            sql.SQL(" UNION ALL ").join(branches),
            sql.SQL("k DESC, uri, etag" if sort is Sort.SCORE else "k, uri, etag"),
            top,
        )
        return query, params

    def _take(
        self, conn: psycopg.Connection[Any], reviewer: str, items: Sequence[Item]
    ) -> dict[tuple[str, str], datetime]:
        """Claim `items`: (uri, etag) -> end of the lease of those won; the ones another reviewer
        claimed first (their transaction won), or that were decided meanwhile, are left out."""
        query = sql.SQL(
            "INSERT INTO {claims} AS c (uri, etag, reviewer, expires_at)"
            " SELECT k.uri, k.etag, %s, now() + make_interval(secs => %s)"
            " FROM unnest(%s::text[], %s::text[]) AS k(uri, etag)"
            " ON CONFLICT (uri, etag) DO UPDATE SET reviewer = EXCLUDED.reviewer, expires_at = EXCLUDED.expires_at"
            " WHERE c.reviewer = EXCLUDED.reviewer OR c.expires_at <= now()"
            " RETURNING c.uri, c.etag, c.expires_at"
        ).format(claims=sql.Identifier(CLAIMS))
        uris = [item.uri for item in items]
        etags = [item.etag for item in items]
        with conn.transaction():
            won = {
                (uri, etag): until for uri, etag, until in conn.execute(query, (reviewer, self.lease_s, uris, etags))
            }
        # an item decided between reading the candidates and claiming them is given back at once
        changed = sql.SQL(
            "SELECT k.uri, k.etag FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(uri, etag, state)"
            " WHERE NOT EXISTS (SELECT 1 FROM {t} AS r WHERE r.uri = k.uri AND r.etag = k.etag"
            " AND r.review_state IS NOT DISTINCT FROM k.state)"
        ).format(t=self._t)
        taken = [item for item in items if (item.uri, item.etag) in won]
        states = [_state_of(item.reason) for item in taken]
        gone = conn.execute(changed, ([i.uri for i in taken], [i.etag for i in taken], states)).fetchall()
        if gone:
            self._release(conn, reviewer, [(uri, etag) for uri, etag in gone])
            for uri, etag in gone:
                won.pop((uri, etag), None)
        return won

    def _item(self, row: dict[str, Any]) -> Item:
        scores = row["scores"] if isinstance(row["scores"], dict) else {}
        tags = row["tags"] if isinstance(row["tags"], list) else []
        numbers = {
            str(k): float(v) for k, v in scores.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        labels = sorted(
            (Label(name, numbers.get(name, 0.0), limit) for name, limit in self.bands.thresholds.items()),
            key=lambda label: (-label.score, label.label),
        )
        state = row["review_state"]
        reason = {State.SECOND: "second-look", State.ESCALATED: "escalated"}.get(state) or (
            "flagged" if row["flagged"] else "audit"
        )
        return Item(
            uri=row["uri"],
            etag=row["etag"],
            job_id=row["job_id"],
            flagged=bool(row["flagged"]),
            reason=reason,
            caption=row["caption"],
            scores=numbers,
            tags=[t for t in tags if isinstance(t, dict)],
            labels=labels,
            key=row["k"],
            cursor=encode_cursor(row["k"], row["uri"], row["etag"]),
        )

    def renew(self, reviewer: str, keys: Sequence[tuple[str, str]]) -> Renewed:
        """Extend the reviewer's live claims on `keys` by a lease; the others are reported lost."""
        query = (
            f"UPDATE {CLAIMS} AS c SET expires_at = now() + make_interval(secs => %s)"
            " FROM unnest(%s::text[], %s::text[]) AS k(uri, etag)"
            " WHERE c.uri = k.uri AND c.etag = k.etag AND c.reviewer = %s AND c.expires_at > now()"
            " RETURNING c.uri, c.etag, c.expires_at"
        )
        with self.pool.connection() as conn:
            rows = conn.execute(query, (self.lease_s, [k[0] for k in keys], [k[1] for k in keys], reviewer)).fetchall()
        renewed = {(uri, etag): until for uri, etag, until in rows}
        return Renewed(renewed, [key for key in dict.fromkeys(keys) if key not in renewed])

    def release(self, reviewer: str, keys: Sequence[tuple[str, str]] | None = None) -> int:
        """Give back the reviewer's claims on `keys` (all of them with None): how many there were."""
        with self.pool.connection() as conn:
            return self._release(conn, reviewer, keys)

    def _release(self, conn: psycopg.Connection[Any], reviewer: str, keys: Sequence[tuple[str, str]] | None) -> int:
        if keys is None:
            return conn.execute(f"DELETE FROM {CLAIMS} WHERE reviewer = %s", (reviewer,)).rowcount
        return conn.execute(
            f"DELETE FROM {CLAIMS} AS c USING unnest(%s::text[], %s::text[]) AS k(uri, etag)"
            " WHERE c.uri = k.uri AND c.etag = k.etag AND c.reviewer = %s",
            ([k[0] for k in keys], [k[1] for k in keys], reviewer),
        ).rowcount

    def has_record(self, uri: str, etag: str | None = None) -> bool:
        """Whether the store holds a current record of `uri` (with this etag, when given)."""
        query = sql.SQL("SELECT 1 FROM {view} WHERE uri = %s AND (%s::text IS NULL OR etag = %s) LIMIT 1").format(
            view=self._view
        )
        with self.pool.connection() as conn:
            return conn.execute(query, (uri, etag, etag)).fetchone() is not None

    # -- counts ----------------------------------------------------------------------------------

    def counts(self, reviewer: str, filters: Filters = Filters(), queue: Queue = Queue.PEOPLE) -> Counts:
        """The queue's counts: the tally (base of the last recount and every decision's delta since),
        and under filters the open items counted up to COUNT_CAP."""
        with self.pool.connection() as conn:
            tally = self._tally(conn)
            counts = Counts(
                left=max(tally["left"], 0),
                done=max(tally["done"], 0),
                mine=max(tally[f"mine:{reviewer}"], 0),
                second_looks=max(tally["second"], 0),
                escalated=max(tally["escalated"], 0),
            )
            if filters.any or queue is Queue.LEADS:
                counts.left = self._bounded_count(conn, reviewer, filters, queue)
                counts.left_capped = counts.left > COUNT_CAP
                counts.left = min(counts.left, COUNT_CAP)
        return counts

    def _tally(self, conn: psycopg.Connection[Any]) -> Counter[str]:
        rows = conn.execute(
            f"SELECT key, sum(n)::bigint FROM (SELECT key, n FROM {TALLY} UNION ALL SELECT key, n FROM {TALLY_DELTA})"
            " AS t GROUP BY key"
        ).fetchall()
        return Counter({key: int(n) for key, n in rows})

    def _bounded_count(self, conn: psycopg.Connection[Any], reviewer: str, filters: Filters, queue: Queue) -> int:
        params: dict[str, Any] = {"reviewer": reviewer}
        parts = []
        for branch in self._branches(queue, reviewer, filters):
            conditions = branch.conditions
            self._filtered(conditions, filters, params)
            conditions.append(self._current())
            # in the claim's order: the planner then walks the same index a claim does, and stops at
            # the cap, instead of betting on a scan of the table finding the rows early
            parts.append(
                sql.SQL("(SELECT 1 FROM {t} AS r WHERE {where} ORDER BY {key} DESC, r.uri, r.etag LIMIT {cap})").format(
                    t=self._t,
                    where=sql.SQL(" AND ").join(conditions),
                    key=self._key(filters.label),
                    cap=sql.Literal(COUNT_CAP + 1),
                )
            )
        query = sql.SQL("SELECT count(*) FROM ({}) AS q").format(sql.SQL(" UNION ALL ").join(parts))
        row = conn.execute(query, params, prepare=False).fetchone()
        return int(row[0]) if row else 0

    def recount(self, older_than_s: float = 0.0) -> bool:
        """Count the queue afresh in one snapshot: the new base replaces the old, and exactly the
        deltas that snapshot saw are deleted (a decision committed meanwhile keeps its delta). False
        when another replica is recounting, or the base is younger than `older_than_s`."""
        with self.pool.connection() as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            try:
                with conn.transaction():
                    if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_RECOUNT_LOCK,)).fetchone()[0]:  # type: ignore[index]
                        return False
                    age = conn.execute(
                        f"SELECT extract(epoch FROM now() - value::timestamptz) FROM {META} WHERE key = 'counted_at'"
                    ).fetchone()
                    if age is not None and older_than_s > 0 and float(age[0]) < older_than_s:
                        return False
                    counts = self._count_everything(conn)
                    conn.execute(f"DELETE FROM {TALLY_DELTA}")
                    conn.execute(f"DELETE FROM {TALLY}")
                    conn.execute(
                        f"INSERT INTO {TALLY} (key, n) SELECT * FROM unnest(%s::text[], %s::bigint[])",
                        (list(counts), list(counts.values())),
                    )
                    conn.execute(
                        f"INSERT INTO {META} (key, value) VALUES ('counted_at', now()::text)"
                        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                    )
            finally:
                conn.isolation_level = None
        return True

    def _count_everything(self, conn: psycopg.Connection[Any]) -> Counter[str]:
        live = review_condition(REVIEW_LIVE)
        audit = sql.SQL("{} < {}").format(sql.SQL(AUDIT_HASH.format(uri="r.uri")), sql.Literal(self._audit_below))
        bands = self._outside_bands()
        flagged_open = sql.SQL(" AND ").join([sql.SQL("r.flagged"), *bands]) if bands else sql.SQL("r.flagged")
        states = sql.SQL(
            "SELECT r.review_state, ({flagged_open} OR (r.flagged IS FALSE AND {audit})), count(*) FROM {t} AS r"
            " WHERE {live} AND (r.review_state IS NOT NULL OR r.flagged OR (r.flagged IS FALSE AND {audit}))"
            " AND {current} GROUP BY 1, 2"
        ).format(flagged_open=flagged_open, audit=audit, t=self._t, live=live, current=self._current())
        standing = sql.SQL(
            "SELECT s.reviewer, count(*) FROM {t} AS r CROSS JOIN LATERAL (SELECT d.reviewer FROM {reviews} AS d"
            " WHERE d.uri = r.uri AND d.etag = r.etag AND NOT d.second_look ORDER BY d.id DESC LIMIT 1) AS s"
            " WHERE r.review_state IS NOT NULL AND {live} AND {current} GROUP BY 1"
        ).format(t=self._t, reviews=sql.Identifier(REVIEWS), live=live, current=self._current())
        counts: Counter[str] = Counter({"left": 0, "done": 0, "second": 0, "escalated": 0})
        for state, eligible, n in conn.execute(states, prepare=False):
            for key, value in _contribution(state, bool(eligible), None).items():
                counts[key] += value * int(n)
        for reviewer, n in conn.execute(standing, prepare=False):
            counts[f"mine:{reviewer}"] += int(n)
        return counts

    def _add_deltas(self, conn: psycopg.Connection[Any], delta: Counter[str]) -> None:
        changed = {key: n for key, n in delta.items() if n}
        if changed:
            conn.execute(
                f"INSERT INTO {TALLY_DELTA} (key, n) SELECT * FROM unnest(%s::text[], %s::bigint[])",
                (list(changed), list(changed.values())),
            )

    def queue_size(self) -> int:
        """Open items (the tally's count)."""
        with self.pool.connection() as conn:
            return max(self._tally(conn)["left"], 0)

    # -- decisions -------------------------------------------------------------------------------

    def decide(
        self,
        reviewer: Reviewer,
        uri: str,
        etag: str,
        decision: Decision,
        note: str | None = None,
        reason: str | None = None,
        override: bool = False,
    ) -> Stored:
        """Append a decision, under the item's lock. NotFound: no current record (uri, etag);
        HeldByAnother: someone else's live claim; Conflict: another reviewer's standing decision (a
        lead's `override` changes it, recorded as such); NotLead: an override by a reviewer. On an
        item sampled for a second look, a decision by another reviewer is that second look; on an
        escalated item, a lead's decision is final. The reviewer's claim on it ends."""
        if override and not reviewer.lead:
            raise NotLead("only a lead may override a decision")
        with self.pool.connection() as conn, conn.transaction():
            before = self._lock_item(conn, uri, etag)
            holder = conn.execute(
                f"SELECT reviewer FROM {CLAIMS} WHERE uri = %s AND etag = %s AND expires_at > now()",
                (uri, etag),
            ).fetchone()
            if holder is not None and holder[0] != reviewer.name:
                raise HeldByAnother(holder[0])
            standing, looked = self._standing(conn, uri, etag)
            second_look = False
            overrode = False
            if (
                before.state == State.SECOND
                and standing is not None
                and standing.reviewer != reviewer.name
                and looked is None
                and not override
            ):
                second_look = True
            elif standing is not None and standing.reviewer != reviewer.name:
                final = standing.decision == Decision.ESCALATE and reviewer.lead
                if not (final or (override and reviewer.lead)):
                    raise Conflict(standing)
                overrode = not final
            stored = self._append(
                conn, uri, etag, str(decision), reviewer, note, reason, override=overrode, second_look=second_look
            )
            if second_look:
                state: str | None = State.DECIDED
                after_standing = standing.reviewer if standing else None
            else:
                state = self._state_after(uri, stored)
                after_standing = reviewer.name
            self._set_state(conn, uri, etag, state)
            conn.execute(f"DELETE FROM {CLAIMS} WHERE uri = %s AND etag = %s", (uri, etag))
            self._add_deltas(
                conn,
                _delta(before.state, standing.reviewer if standing else None, state, after_standing, before.eligible),
            )
        return stored

    def _state_after(self, uri: str, stored: Stored) -> str:
        """The state a new first-look decision puts its item in."""
        if stored.decision == Decision.ESCALATE:
            return State.ESCALATED
        if stored.override or stored.role == Role.LEAD:
            return State.DECIDED
        rate = self.bands.auto_audit_rate if stored.reviewer == AUTO else self.bands.second_look_rate
        return State.SECOND if second_hash(uri) < audit_threshold(rate) else State.DECIDED

    def _lock_item(self, conn: psycopg.Connection[Any], uri: str, etag: str) -> "_Before":
        """Take the item's lock and read its current record: NotFound when there is none."""
        conn.execute(
            sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.SQL(_ITEM_LOCK.format(uri="%s", etag="%s"))),
            (uri, etag),
        )
        row = conn.execute(
            sql.SQL(
                "SELECT r.review_state, r.flagged, r.record -> 'moderation' -> 'scores' FROM {t} AS r"
                " WHERE r.uri = %s AND r.etag = %s AND {current}"
            ).format(t=self._t, current=self._current()),
            (uri, etag),
        ).fetchone()
        if row is None:
            raise NotFound(f"no current record of {uri} with etag {etag!r}")
        state, flagged, scores = row
        return _Before(state, self._eligible(uri, flagged, scores if isinstance(scores, dict) else {}))

    def _eligible(self, uri: str, flagged: bool | None, scores: Mapping[str, Any]) -> bool:
        """Whether an undecided item would be in the people's queue (and so in `left`)."""
        if flagged:
            return not self._in_band(scores)
        return flagged is False and audit_hash(uri) < self._audit_below

    def _in_band(self, scores: Mapping[str, Any]) -> bool:
        def value(label: str) -> float:
            number = scores.get(label, 0)
            return float(number) if isinstance(number, int | float) else 0.0

        top = max((value(label) for label in self.labels), default=0.0)
        return any(
            (top if len(self.labels) == 1 else value(label)) >= floor for label, floor in self.bands.auto_reject.items()
        )

    def _standing(self, conn: psycopg.Connection[Any], uri: str, etag: str) -> tuple["Stored | None", "Stored | None"]:
        """The item's standing decision and its standing second look (None where undone or absent)."""
        rows = conn.execute(
            f"SELECT DISTINCT ON (second_look) {_STORED} FROM {REVIEWS} WHERE uri = %s AND etag = %s"
            " ORDER BY second_look, id DESC",
            (uri, etag),
        ).fetchall()
        latest = {row[10]: Stored(*row) for row in rows}
        first, second = latest.get(False), latest.get(True)
        if first is None or first.decision == UNDO:
            return None, None
        # a second look counts for the standing decision it followed
        if second is None or second.decision == UNDO or second.id < first.id:
            second = None
        return first, second

    def _set_state(self, conn: psycopg.Connection[Any], uri: str, etag: str, state: str | None) -> None:
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET review_state = %s WHERE uri = %s AND etag = %s AND review_state IS DISTINCT FROM %s"
            ).format(t=self._t),
            (state, uri, etag, state),
        )

    def undo(self, reviewer: Reviewer) -> tuple[Stored, Item | None]:
        """Take back the reviewer's latest decision that still stands (a first look, or a second
        look): an `undo` row is appended, the item goes back to where it was, and it is theirs again
        for a lease. NotFound when nothing of theirs stands."""
        last = sql.SQL(
            "SELECT {stored} FROM {reviews} AS d"
            " WHERE d.reviewer = %s AND d.decision <> 'undo' AND NOT EXISTS"
            " (SELECT 1 FROM {reviews} AS l WHERE l.uri = d.uri AND l.etag = d.etag AND l.id > d.id"
            " AND (l.second_look = d.second_look OR NOT l.second_look))"
            " ORDER BY d.id DESC LIMIT 1"
        ).format(stored=sql.SQL(", ".join(f"d.{c}" for c in _STORED.split(", "))), reviews=sql.Identifier(REVIEWS))
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(last, (reviewer.name,)).fetchone()
            if row is None:
                raise NotFound("no decision of yours to undo")
            undone = Stored(*row)
            try:
                before = self._lock_item(conn, undone.uri, undone.etag)
            except NotFound:
                raise NotFound("the image of your last decision was replaced or deleted; nothing to undo") from None
            standing, looked = self._standing(conn, undone.uri, undone.etag)
            mine = looked if undone.second_look else standing
            if mine is None or mine.id != undone.id:
                raise NotFound("your last decision was just changed; reload the page")
            self._append(conn, undone.uri, undone.etag, UNDO, reviewer, None, None, second_look=undone.second_look)
            state = State.SECOND if undone.second_look else None
            after_standing = standing.reviewer if (undone.second_look and standing) else None
            self._set_state(conn, undone.uri, undone.etag, state)
            conn.execute(
                f"INSERT INTO {CLAIMS} (uri, etag, reviewer, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (uri, etag) DO UPDATE SET reviewer = EXCLUDED.reviewer, expires_at = EXCLUDED.expires_at",
                (undone.uri, undone.etag, reviewer.name, self.lease_s),
            )
            self._add_deltas(
                conn,
                _delta(before.state, standing.reviewer if standing else None, state, after_standing, before.eligible),
            )
            item = self._one_item(conn, undone.uri, undone.etag)
        return undone, item

    def _one_item(self, conn: psycopg.Connection[Any], uri: str, etag: str) -> Item | None:
        query = sql.SQL(
            "SELECT r.uri, r.etag, r.job_id, r.flagged, r.caption, r.review_state, r.written_at, {key} AS k,"
            " r.record -> 'moderation' -> 'scores' AS scores, r.record -> 'tags' -> 'labels' AS tags"
            " FROM {t} AS r WHERE r.uri = %s AND r.etag = %s AND {current}"
        ).format(key=self._key(), t=self._t, current=self._current())
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, (uri, etag)).fetchone()
        return self._item(row) if row else None

    def _append(
        self,
        conn: psycopg.Connection[Any],
        uri: str,
        etag: str,
        decision: str,
        reviewer: Reviewer,
        note: str | None,
        reason: str | None,
        *,
        rule: str | None = None,
        override: bool = False,
        second_look: bool = False,
    ) -> Stored:
        row = conn.execute(
            f"INSERT INTO {REVIEWS} (uri, etag, decision, reviewer, role, note, reason, rule, override, second_look)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_STORED}",
            (
                uri,
                etag,
                decision,
                reviewer.name,
                str(reviewer.role) if reviewer.name != AUTO else AUTO,
                note,
                reason,
                rule,
                override,
                second_look,
            ),
        ).fetchone()
        assert row is not None
        return Stored(*row)

    # -- the auto-reject bands -------------------------------------------------------------------

    def sweep(self, batch: int = SWEEP_BATCH) -> int:
        """Reject the open items at or above an auto-reject floor, as decisions by `auto` with the
        rule; a share of them (`auto_audit_rate`) still goes to a person for a second look. Items
        another transaction is deciding are left for the next sweep. How many were decided."""
        total = 0
        for label, floor in sorted(self.bands.auto_reject.items()):
            while True:
                done = self._sweep_batch(label, floor, batch)
                total += done
                if done < batch:
                    break
        return total

    def _sweep_batch(self, label: str, floor: float, batch: int) -> int:
        key = self._key(label)
        picked = sql.SQL(
            "SELECT r.uri, r.etag FROM {t} AS r WHERE r.flagged AND {open} AND {live} AND {key} >= %(floor)s"
            " AND {current} ORDER BY {key} DESC, r.uri, r.etag LIMIT %(batch)s"
        ).format(
            t=self._t,
            open=review_condition(REVIEW_OPEN),
            live=review_condition(REVIEW_LIVE),
            key=key,
            current=self._current(),
        )
        auto = Reviewer(AUTO)
        rule = f"{label} >= {floor:g}"
        with self.pool.connection() as conn, conn.transaction():
            rows = conn.execute(picked, {"floor": floor, "batch": batch}, prepare=False).fetchall()
            if not rows:
                return 0
            # the items no decision holds now: locked here (skipping any being decided), still open
            locked = conn.execute(
                sql.SQL(
                    "SELECT k.uri, k.etag FROM unnest(%s::text[], %s::text[]) AS k(uri, etag)"
                    " WHERE pg_try_advisory_xact_lock({lock})"
                    " AND EXISTS (SELECT 1 FROM {t} AS r WHERE r.uri = k.uri AND r.etag = k.etag"
                    " AND r.review_state IS NULL)"
                ).format(lock=sql.SQL(_ITEM_LOCK.format(uri="k.uri", etag="k.etag")), t=self._t),
                ([r[0] for r in rows], [r[1] for r in rows]),
            ).fetchall()
            delta: Counter[str] = Counter()
            for uri, etag in locked:
                stored = self._append(conn, uri, etag, str(Decision.REJECT), auto, None, None, rule=rule)
                state = self._state_after(uri, stored)
                self._set_state(conn, uri, etag, state)
                delta += _contribution(state, False, AUTO)
            if locked:
                conn.execute(
                    f"DELETE FROM {CLAIMS} AS c USING unnest(%s::text[], %s::text[]) AS k(uri, etag)"
                    " WHERE c.uri = k.uri AND c.etag = k.etag",
                    ([k[0] for k in locked], [k[1] for k in locked]),
                )
            self._add_deltas(conn, delta)
        return len(rows)

    # -- reports ---------------------------------------------------------------------------------

    def reviewer_stats(self) -> list[ReviewerStats]:
        """Per reviewer: standing decisions on current items, decisions in the last hour, in all,
        overrides and second looks (auto included)."""
        query = (
            "SELECT reviewer, count(*) FILTER (WHERE decided_at > now() - interval '1 hour'), count(*),"
            " count(*) FILTER (WHERE override), count(*) FILTER (WHERE second_look)"
            f" FROM {REVIEWS} WHERE decision <> 'undo' GROUP BY reviewer ORDER BY reviewer"
        )
        with self.pool.connection() as conn:
            tally = self._tally(conn)
            rows = conn.execute(query).fetchall()
        return [
            ReviewerStats(name, max(tally[f"mine:{name}"], 0), int(hour), int(total), int(overrides), int(second))
            for name, hour, total, overrides, second in rows
        ]

    def agreement(self) -> list[Agreement]:
        """Second looks that stand, against the first-look decision they followed: by `auto`, or by people."""
        query = sql.SQL(
            "SELECT f.reviewer = %s, count(*), count(*) FILTER (WHERE f.decision = s.decision) FROM"
            " (SELECT DISTINCT ON (uri, etag) id, uri, etag, decision FROM {reviews} WHERE second_look"
            "  ORDER BY uri, etag, id DESC) AS s"
            " JOIN LATERAL (SELECT reviewer, decision FROM {reviews} AS d WHERE d.uri = s.uri AND d.etag = s.etag"
            "  AND NOT d.second_look AND d.id < s.id ORDER BY d.id DESC LIMIT 1) AS f ON true"
            " WHERE s.decision <> 'undo' AND f.decision <> 'undo' GROUP BY 1"
        ).format(reviews=sql.Identifier(REVIEWS))
        with self.pool.connection() as conn:
            rows = {bool(auto): (int(pairs), int(agreed)) for auto, pairs, agreed in conn.execute(query, (AUTO,))}
        return [Agreement(name, *rows.get(is_auto, (0, 0))) for name, is_auto in (("auto", True), ("people", False))]

    def decisions(self, everything: bool = False) -> Iterator[tuple[Stored, bool]]:
        """(decision, whether its (uri, etag) is still the object's current record): the decisions
        that stand (latest first look and second look per item, undone ones left out), oldest first;
        with `everything`, every row of the log, undos included. Streamed from a server-side cursor."""
        current = sql.SQL("EXISTS (SELECT 1 FROM {view} AS v WHERE v.uri = d.uri AND v.etag = d.etag)").format(
            view=self._view
        )
        columns = sql.SQL(", ").join(sql.SQL("d.") + sql.SQL(c) for c in _STORED.split(", "))
        if everything:
            query = sql.SQL("SELECT {columns}, {current} FROM {reviews} AS d ORDER BY d.id")
        else:
            query = sql.SQL(
                "SELECT {columns}, {current} FROM (SELECT DISTINCT ON (uri, etag, second_look) * FROM {reviews}"
                " ORDER BY uri, etag, second_look, id DESC) AS d WHERE d.decision <> 'undo' ORDER BY d.id"
            )
        statement = query.format(columns=columns, current=current, reviews=sql.Identifier(REVIEWS))
        with self.pool.connection() as conn, conn.transaction(), conn.cursor(name="imagemill_export") as cur:
            cur.execute(statement)
            for row in cur:
                yield Stored(*row[:-1]), bool(row[-1])


@dataclass(frozen=True)
class _Branch:
    conditions: list[sql.Composable]
    undecided: bool  # its rows must also have no standing decision in the log


@dataclass(frozen=True)
class _Before:
    state: str | None
    eligible: bool


def _delta(
    state_before: str | None,
    standing_before: str | None,
    state_after: str | None,
    standing_after: str | None,
    eligible: bool,
) -> Counter[str]:
    """What an item's change from one state to another adds to each count (negative included)."""
    delta: Counter[str] = Counter()
    delta.update(_contribution(state_after, eligible, standing_after))
    delta.subtract(_contribution(state_before, eligible, standing_before))
    return delta


def _with_lease(item: Item, until: datetime) -> Item:
    return Item(**{**item.__dict__, "claimed_until": until})


def _state_of(reason: str) -> str | None:
    return {"second-look": State.SECOND, "escalated": State.ESCALATED}.get(reason)


def _schema() -> list[str]:
    """The review's own tables and their indexes (the records table's are the sink's); the columns
    an earlier imagemill's decision log lacks are added with defaults that rewrite nothing."""
    return [
        f"CREATE TABLE IF NOT EXISTS {CLAIMS} ("
        " uri text NOT NULL, etag text NOT NULL, reviewer text NOT NULL, expires_at timestamptz NOT NULL,"
        " PRIMARY KEY (uri, etag))",
        f"CREATE INDEX IF NOT EXISTS {CLAIMS}_expires_idx ON {CLAIMS} (expires_at)",
        f"CREATE INDEX IF NOT EXISTS {CLAIMS}_reviewer_idx ON {CLAIMS} (reviewer)",
        # a small table that churns: analyzed every 100 changed rows, or the planner takes it for
        # empty and scans it once per queued record instead of probing its key
        f"ALTER TABLE {CLAIMS} SET (autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 100)",
        f"CREATE TABLE IF NOT EXISTS {REVIEWS} ("
        " id bigserial PRIMARY KEY, uri text NOT NULL, etag text NOT NULL,"
        " decision text NOT NULL CHECK (decision IN ('approve', 'reject', 'escalate', 'undo')),"
        " reviewer text NOT NULL, note text, decided_at timestamptz NOT NULL DEFAULT now())",
        f"ALTER TABLE {REVIEWS} ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT 'reviewer',"
        " ADD COLUMN IF NOT EXISTS reason text, ADD COLUMN IF NOT EXISTS rule text,"
        " ADD COLUMN IF NOT EXISTS override boolean NOT NULL DEFAULT false,"
        " ADD COLUMN IF NOT EXISTS second_look boolean NOT NULL DEFAULT false",
        f"CREATE INDEX IF NOT EXISTS {REVIEWS}_key_idx ON {REVIEWS} (uri, etag, id DESC)",
        f"CREATE INDEX IF NOT EXISTS {REVIEWS}_reviewer_idx ON {REVIEWS} (reviewer, id DESC)",
        f"CREATE INDEX IF NOT EXISTS {REVIEWS}_second_idx ON {REVIEWS} (uri, etag, id DESC) WHERE second_look",
        f"CREATE TABLE IF NOT EXISTS {TALLY} (key text PRIMARY KEY, n bigint NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {TALLY_DELTA} (id bigserial PRIMARY KEY, key text NOT NULL, n bigint NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {META} (key text PRIMARY KEY, value text NOT NULL)",
    ]
