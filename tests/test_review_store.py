"""The review queue's store as a specification, without HTTP: what a claim hands out and in which
order, leases, renewals and releases, decisions and who may make them, the leads' queue, second
looks, undo, the counts, the filters, and the decision log's export.

One database for the module (a fresh one is the slow part); each test empties its tables and opens
stores with the bands it needs. No audits and no second looks unless a test asks for them.
"""

import concurrent.futures
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from imagemill.core.errors import ErrorKind
from imagemill.core.schemas import Caption, Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.review.settings import Reviewer, Role
from imagemill.review.store import (
    AUDIT_SPACE,
    COUNT_CAP,
    Agreement,
    Bands,
    Claimed,
    Conflict,
    Counts,
    Decision,
    Filters,
    HeldByAnother,
    Item,
    Label,
    NotFound,
    NotLead,
    Queue,
    ReviewerStats,
    ReviewStore,
    Sort,
    Stored,
    audit_hash,
    audit_threshold,
    encode_cursor,
    second_hash,
)
from tests.fixtures.postgres import admin_url, fresh_database

pytestmark = pytest.mark.slow

ALICE, BOB, CAROL = Reviewer("alice"), Reviewer("bob"), Reviewer("carol", Role.LEAD)
THRESHOLDS = {"nsfw": 0.5, "violence": 0.8}
TABLES = (
    "imagemill_records",
    "imagemill_review_claims",
    "imagemill_reviews",
    "imagemill_review_tally",
    "imagemill_review_tally_delta",
    "imagemill_review_meta",
)
LEASE_S = 300

OpenStore = Callable[..., ReviewStore]


def record(
    name: str,
    nsfw: float,
    violence: float | None = 0.1,
    *,
    flagged: bool | None = None,
    job: str = "job-1",
    etag: str = "e1",
    error: bool = False,
    signature: str = "sig",
) -> Record:
    """A record of `s3://bucket/<name>.jpg`: flagged when a score crosses its threshold, unless told."""
    scores = {"nsfw": nsfw, **({"violence": violence} if violence is not None else {})}
    crossed = any(scores.get(label, 0.0) >= limit for label, limit in THRESHOLDS.items())
    return Record(
        uri=f"s3://bucket/{name}.jpg",
        etag=etag,
        signature=signature,
        job_id=job,
        caption=Caption(text=f"a photo called {name}", model="m"),
        moderation=Moderation(flagged=crossed if flagged is None else flagged, scores=scores, model="m"),
        tags=Tags(labels=[TagScore(tag="sky", score=0.4), TagScore(tag="sea", score=0.2)], model="m"),
        error=RecordError(kind=ErrorKind.TRUNCATED, message="broken") if error else None,
    )


def uri(name: str) -> str:
    return f"s3://bucket/{name}.jpg"


def names(items: list[Item] | Claimed) -> list[str]:
    found = items.items if isinstance(items, Claimed) else items
    return [item.uri.removeprefix("s3://bucket/").removesuffix(".jpg") for item in found]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database(admin_url()) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            # no wait for the disk at each commit: nothing here outlives the module
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(url.rsplit("/", 1)[1]))
            )
        yield url


@pytest.fixture(scope="module")
def stores(database: str) -> Iterator[dict[str, ReviewStore]]:
    """One store per set of bands for the module: setting one up (its indexes) is most of a test's time."""
    made: dict[str, ReviewStore] = {}
    yield made
    for store in made.values():
        store.close()


@pytest.fixture
def open_store(database: str, stores: dict[str, ReviewStore]) -> OpenStore:
    """`open_store(*records, **bands)`: empty tables, these records written and counted, a store set up."""
    if stores:  # the first store makes the tables
        with psycopg.connect(database) as conn:
            for table in TABLES:  # DELETE: a few rows each, and TRUNCATE's new files cost more
                conn.execute(f"DELETE FROM {table}")

    def make(*records: Record, **bands: Any) -> ReviewStore:
        quiet = {"audit_rate": 0.0, "second_look_rate": 0.0, "auto_audit_rate": 0.0}
        key = repr(sorted({**quiet, **bands}.items()))
        if key not in stores:
            stores[key] = ReviewStore(database, Bands(thresholds=THRESHOLDS, **{**quiet, **bands}), lease_s=LEASE_S)
            stores[key].setup()
        if records:
            write(database, *records)
        stores[key].recount()
        return stores[key]

    return make


def write(url: str, *records: Record) -> None:
    with PostgresSink(url) as sink:
        sink.write(list(records), "test/000001")


def move_claims(url: str, reviewer: str, seconds: float) -> None:
    """The reviewer's claims end `seconds` from now (negative: ended), as if the lease had passed."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE imagemill_review_claims SET expires_at = now() + make_interval(secs => %s) WHERE reviewer = %s",
            (seconds, reviewer),
        )


def claimed_by(url: str) -> dict[str, str]:
    """uri -> reviewer of the live claims."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT uri, reviewer FROM imagemill_review_claims WHERE expires_at > now()").fetchall()
    return dict(rows)


def four(**extra: Any) -> list[Record]:
    """Four flagged records (top thresholded scores 0.97, 0.91, 0.85, 0.55), one unflagged, one error."""
    return [
        record("a", 0.97, 0.10, **extra),
        record("b", 0.62, 0.91, **extra),
        record("c", 0.55, 0.20, **extra),
        record("d", 0.30, 0.85, **extra),
        record("quiet", 0.20, 0.10, **extra),
        record("broken", 0.99, 0.99, error=True, **extra),
    ]


def counted(store: ReviewStore, reviewer: str = "alice", **kwargs: Any) -> dict[str, Any]:
    return store.counts(reviewer, **kwargs).as_dict()


# -- what a claim hands out -------------------------------------------------------------------------


def test_a_claim_hands_out_the_flagged_items_highest_thresholded_score_first(
    open_store: OpenStore, database: str
) -> None:
    store = open_store(*four())
    before = datetime.now(UTC)
    claimed = store.claim(ALICE, 10)
    # the unflagged record is not in the queue without an audit sample, nor is the one that failed
    assert names(claimed) == ["a", "b", "d", "c"]
    assert claimed.expired == 0 and claimed.next_after is None
    first = claimed.items[0]
    assert (first.uri, first.etag, first.job_id, first.flagged, first.reason) == (
        uri("a"),
        "e1",
        "job-1",
        True,
        "flagged",
    )
    assert first.caption == "a photo called a"
    assert first.scores == {"nsfw": 0.97, "violence": 0.1}
    assert [tag["tag"] for tag in first.tags] == ["sky", "sea"]
    assert first.key == 0.97 and first.cursor == encode_cursor(0.97, uri("a"), "e1")
    assert first.claimed_until is not None
    assert before + timedelta(seconds=LEASE_S - 5) < first.claimed_until < before + timedelta(seconds=LEASE_S + 60)
    # every thresholded label, highest score first, each with its threshold and whether it crossed
    second = claimed.items[1]
    assert second.labels == [Label("violence", 0.91, 0.8), Label("nsfw", 0.62, 0.5)]
    assert [label.as_dict() for label in claimed.items[3].labels] == [
        {"label": "nsfw", "score": 0.55, "threshold": 0.5, "crossed": True},
        {"label": "violence", "score": 0.2, "threshold": 0.8, "crossed": False},
    ]
    assert claimed_by(database) == {uri(n): "alice" for n in "abcd"}


def test_a_label_the_record_has_no_score_for_scores_zero(open_store: OpenStore) -> None:
    store = open_store(record("a", 0.7, violence=None))
    (item,) = store.claim(ALICE, 5).items
    assert item.labels == [Label("nsfw", 0.7, 0.5), Label("violence", 0.0, 0.8)]
    assert not item.labels[1].crossed and item.scores == {"nsfw": 0.7}


def test_scores_that_are_not_numbers_are_left_out_of_an_items_scores(open_store: OpenStore, database: str) -> None:
    """A record written by another tool may score a label true or with text: neither is a score
    (true is not 1.0), and an item reads without them."""
    store = open_store(record("a", 0.97))
    with psycopg.connect(database) as conn:
        conn.execute(
            "UPDATE imagemill_records SET record = jsonb_set(jsonb_set(record, '{moderation,scores,weapon}', 'true'),"
            " '{moderation,scores,note}', '\"high\"') WHERE uri = %s",
            (uri("a"),),
        )
    (item,) = store.claim(ALICE, 1).items
    assert item.scores == {"nsfw": 0.97, "violence": 0.1}


def test_the_limit_and_the_cursor_page_through_the_queue_by_score(open_store: OpenStore) -> None:
    store = open_store(*four())
    page = store.claim(ALICE, 2)
    assert names(page) == ["a", "b"] and page.next_after == page.items[-1].cursor
    rest = store.claim(ALICE, 2, after=page.next_after or "")
    assert names(rest) == ["d", "c"] and rest.next_after == rest.items[-1].cursor
    assert store.claim(ALICE, 2, after=rest.next_after or "").items == []
    # a page shorter than the limit is the last one
    assert store.claim(ALICE, 3, after=page.next_after or "").next_after is None


def test_a_full_page_past_the_small_ints_cpython_caches_still_has_a_cursor(open_store: OpenStore) -> None:
    """257 items, the first count that is not one of CPython's cached small ints: the page is full,
    so it says where the next one starts (an identity check of the count would say it is the last)."""
    store = open_store(*[record(f"m{i:03d}", 0.6 + i / 10_000) for i in range(258)])
    claimed = store.claim(ALICE, 257)
    assert len(claimed.items) == 257 and claimed.next_after == claimed.items[-1].cursor
    assert names(store.claim(ALICE, 257, after=claimed.next_after)) == ["m000"]


def test_equal_scores_page_by_uri_and_etag(open_store: OpenStore) -> None:
    store = open_store(*[record(name, 0.9) for name in "pqrs"])
    first = store.claim(ALICE, 2)
    assert names(first) == ["p", "q"]
    assert names(store.claim(ALICE, 5, after=first.items[-1].cursor)) == ["r", "s"]


def test_the_age_sort_hands_out_the_oldest_first(open_store: OpenStore, database: str) -> None:
    store = open_store(*four())
    with psycopg.connect(database) as conn:
        for minutes, name in enumerate(["c", "a", "d", "b"]):
            conn.execute(
                "UPDATE imagemill_records SET written_at = '2026-01-01'::timestamptz + make_interval(mins => %s)"
                " WHERE uri = %s",
                (minutes, uri(name)),
            )
    page = store.claim(ALICE, 3, sort=Sort.AGE)
    assert names(page) == ["c", "a", "d"]
    assert page.items[0].key == datetime(2026, 1, 1, tzinfo=UTC)
    assert names(store.claim(ALICE, 3, sort=Sort.AGE, after=page.next_after or "")) == ["b"]
    with pytest.raises(ValueError, match="another sort order"):
        store.claim(ALICE, 3, after=page.next_after or "")


def test_filters_narrow_the_queue_by_job_label_and_score_bounds_inclusive(open_store: OpenStore) -> None:
    store = open_store(*four(), record("other", 0.99, job="job-2"))
    assert names(store.claim(BOB, 10, Filters(job_id="job-2"))) == ["other"]
    store.release("bob")
    # a label: the items where it crossed, sorted by its own score
    assert names(store.claim(BOB, 10, Filters(label="violence"))) == ["b", "d"]
    store.release("bob")
    assert names(store.claim(BOB, 10, Filters(label="nsfw", max_score=0.62))) == ["b", "c"]
    store.release("bob")
    assert names(store.claim(BOB, 10, Filters(label="nsfw", min_score=0.62, job_id="job-1"))) == ["a", "b"]
    store.release("bob")
    # without a label, the bounds are on the sort score (the highest thresholded label's)
    assert names(store.claim(BOB, 10, Filters(min_score=0.85, max_score=0.91))) == ["b", "d"]
    store.release("bob")
    assert (
        store.counts("bob", Filters(label="violence")).left,
        store.counts("bob", Filters(label="violence")).left_capped,
    ) == (2, False)
    assert store.counts("bob", Filters(job_id="job-1", max_score=0.9)).left == 2
    assert store.counts("bob", Filters(min_score=0.55, max_score=0.55)).left == 1


def test_a_filtered_count_stops_at_the_cap_and_says_so(open_store: OpenStore) -> None:
    store = open_store(*[record(f"n{i:04}", 0.9, job="big") for i in range(COUNT_CAP + 1)])
    assert counted(store) == {
        "left": COUNT_CAP + 1,
        "left_capped": False,
        "done": 0,
        "mine": 0,
        "second_looks": 0,
        "escalated": 0,
    }
    capped = store.counts("alice", Filters(job_id="big"))
    assert (capped.left, capped.left_capped) == (500, True)
    store.claim(ALICE, 1)
    store.decide(ALICE, uri("n0000"), "e1", Decision.APPROVE)
    exact = store.counts("alice", Filters(job_id="big"))
    assert (exact.left, exact.left_capped) == (500, False)


# -- leases -----------------------------------------------------------------------------------------


def test_claims_never_overlap_and_a_reviewers_own_come_back_renewed(open_store: OpenStore) -> None:
    store = open_store(*four())
    mine = store.claim(ALICE, 2)
    assert names(mine) == ["a", "b"]
    assert names(store.claim(BOB, 10)) == ["d", "c"]
    assert store.claim(CAROL, 10).items == []
    again = store.claim(ALICE, 10)
    assert names(again) == ["a", "b"]
    assert all(
        new.claimed_until and old.claimed_until and new.claimed_until >= old.claimed_until
        for new, old in zip(again.items, mine.items, strict=True)
    )


class PicksWithTheOther(ReviewStore):
    """A reviewer's store whose first claim waits until the other reviewer's has picked its
    candidates too: both then claim the same items, which neither holds yet."""

    def __init__(self, url: str, picked: threading.Barrier) -> None:
        super().__init__(url, Bands(thresholds=THRESHOLDS, audit_rate=0.0), lease_s=LEASE_S)
        self.picked: threading.Barrier | None = picked

    def _take(self, conn: psycopg.Connection, reviewer: str, items: Sequence[Item]) -> dict:
        if self.picked is not None:
            self.picked, picked = None, self.picked
            picked.wait()
        return super()._take(conn, reviewer, items)


def test_reviewers_who_picked_the_same_candidates_at_once_never_claim_the_same_item(
    open_store: OpenStore, database: str
) -> None:
    """The race the primary key alone does not stop, made to happen every time: only the claim's
    conditional upsert keeps the two apart."""
    open_store(*four())
    picked = threading.Barrier(2, timeout=30)
    racers = [PicksWithTheOther(database, picked), PicksWithTheOther(database, picked)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            alice, bob = pool.map(lambda store, who: set(names(store.claim(who, 10))), racers, [ALICE, BOB])
    finally:
        for store in racers:
            store.close()
    assert not alice & bob, f"both hold {sorted(alice & bob)}"
    assert alice | bob == set("abcd")


class RacedFor(ReviewStore):
    """A reviewer's store that loses its first candidate of each of its first `losses` rounds: another
    reviewer claims it between the pick and the claim."""

    def __init__(self, url: str, losses: int) -> None:
        super().__init__(url, Bands(thresholds=THRESHOLDS, audit_rate=0.0), lease_s=LEASE_S)
        self.losses = losses

    def _take(self, conn: psycopg.Connection, reviewer: str, items: Sequence[Item]) -> dict:
        if self.losses:
            self.losses -= 1
            conn.execute(
                "INSERT INTO imagemill_review_claims VALUES (%s, %s, 'bob', now() + interval '5 minutes')",
                (items[0].uri, items[0].etag),
            )
        return super()._take(conn, reviewer, items)


@pytest.mark.parametrize(
    ("limit", "losses", "got"), [(2, 1, "bd"), (2, 3, "be"), (2, 4, "b"), (3, 1, "bdc"), (3, 3, "bdf"), (3, 4, "bd")]
)
def test_a_claim_that_loses_candidates_fills_up_with_the_next_ones_in_up_to_four_rounds(
    open_store: OpenStore, database: str, limit: int, losses: int, got: str
) -> None:
    """Scores a .97, b .91, d .85, c .55, e .52, f .51, g .505; each round loses its first new candidate."""
    open_store(*four(), record("e", 0.52), record("f", 0.51), record("g", 0.505))
    store = RacedFor(database, losses)
    try:
        claimed = store.claim(ALICE, limit)
    finally:
        store.close()
    # never more than the limit; the items lost go to whoever won them
    assert names(claimed) == list(got)
    assert {uri for uri, who in claimed_by(database).items() if who == "alice"} == {uri(n) for n in got}


class OvertakenByNewRecords(ReviewStore):
    """A reviewer's store whose first claim loses its first candidate to bob while records scoring
    higher than every candidate are written: the next round's candidates are all new ones."""

    def __init__(self, url: str, written: Sequence[Record]) -> None:
        super().__init__(url, Bands(thresholds=THRESHOLDS, audit_rate=0.0), lease_s=LEASE_S)
        self.written = list(written)

    def _take(self, conn: psycopg.Connection, reviewer: str, items: Sequence[Item]) -> dict:
        if self.written:
            self.written, written = [], self.written
            conn.execute(
                "INSERT INTO imagemill_review_claims VALUES (%s, %s, 'bob', now() + interval '5 minutes')",
                (items[0].uri, items[0].etag),
            )
            write(self._url, *written)
        return super()._take(conn, reviewer, items)


def test_a_claim_refilled_after_a_lost_race_takes_only_what_the_limit_has_left(
    open_store: OpenStore, database: str
) -> None:
    """Round one wins three of four (bob took a); four new items scoring above all of them arrive
    meanwhile, so the second round finds four candidates it has not taken: it takes one, never four."""
    open_store(*four())
    store = OvertakenByNewRecords(database, [record(f"n{i}", 0.99 - i / 1000) for i in range(4)])
    try:
        claimed = store.claim(ALICE, 4)
    finally:
        store.close()
    assert names(claimed) == ["n0", "b", "d", "c"]
    assert {u for u, who in claimed_by(database).items() if who == "alice"} == {uri(n) for n in ("n0", "b", "d", "c")}


class DecidedMeanwhile(ReviewStore):
    """A reviewer's store whose first candidate is decided by a lead between the pick and the claim."""

    def __init__(self, url: str, other: ReviewStore) -> None:
        super().__init__(url, other.bands, lease_s=LEASE_S)
        self.other: ReviewStore | None = other

    def _take(self, conn: psycopg.Connection, reviewer: str, items: Sequence[Item]) -> dict:
        if self.other is not None:
            self.other, other = None, self.other
            other.decide(CAROL, items[0].uri, items[0].etag, Decision.REJECT)
        return super()._take(conn, reviewer, items)


def test_an_item_decided_between_the_pick_and_the_claim_is_not_handed_out(open_store: OpenStore, database: str) -> None:
    store = open_store(*four())
    late = DecidedMeanwhile(database, store)
    try:
        claimed = late.claim(ALICE, 2)
    finally:
        late.close()
    assert "a" not in names(claimed) and uri("a") not in claimed_by(database)


def test_an_ended_lease_returns_its_items_to_the_queue_and_is_counted(open_store: OpenStore, database: str) -> None:
    store = open_store(*four())
    assert len(store.claim(ALICE, 3).items) == 3
    move_claims(database, "alice", -1)
    taken = store.claim(BOB, 10)
    assert names(taken) == ["a", "b", "d", "c"] and taken.expired == 3
    with pytest.raises(HeldByAnother) as held:
        store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    assert held.value.reviewer == "bob"


def test_renewing_extends_the_reviewers_live_claims_and_names_the_ones_lost(
    open_store: OpenStore, database: str
) -> None:
    store = open_store(*four())
    items = store.claim(ALICE, 3).items
    keys = [(item.uri, item.etag) for item in items]
    move_claims(database, "alice", 1)
    renewed = store.renew("alice", [*keys, keys[0], (uri("c"), "e1")])
    assert set(renewed.renewed) == set(keys) and renewed.lost == [(uri("c"), "e1")]
    soon = datetime.now(UTC) + timedelta(seconds=LEASE_S - 30)
    assert all(until > soon for until in renewed.renewed.values())
    with psycopg.connect(database) as conn:
        conn.execute(
            "UPDATE imagemill_review_claims SET expires_at = now() - interval '1 second' WHERE uri = %s", (keys[0][0],)
        )
    assert store.renew("bob", keys).lost == keys  # never someone else's
    again = store.renew("alice", keys)
    assert again.lost == [keys[0]] and set(again.renewed) == set(keys[1:])


def test_a_release_gives_items_back_at_once(open_store: OpenStore) -> None:
    store = open_store(*four())
    first = store.claim(ALICE, 3).items[0]
    assert store.release("alice", [(first.uri, first.etag)]) == 1
    assert names(store.claim(BOB, 1)) == ["a"]
    assert store.release("alice") == 2
    assert names(store.claim(BOB, 10)) == ["a", "b", "d", "c"]


# -- decisions --------------------------------------------------------------------------------------


def test_a_decision_is_stored_as_made_leaves_the_queue_and_moves_the_counts(
    open_store: OpenStore, database: str
) -> None:
    store = open_store(*four())
    assert counted(store) == {"left": 4, "left_capped": False, "done": 0, "mine": 0, "second_looks": 0, "escalated": 0}
    assert store.queue_size() == 4
    store.claim(ALICE, 2)
    stored = store.decide(ALICE, uri("a"), "e1", Decision.REJECT, note="see the corner", reason="nudity")
    assert (stored.uri, stored.etag, stored.decision, stored.reviewer, stored.role) == (
        uri("a"),
        "e1",
        "reject",
        "alice",
        "reviewer",
    )
    assert (stored.note, stored.reason, stored.rule, stored.override, stored.second_look) == (
        "see the corner",
        "nudity",
        None,
        False,
        False,
    )
    assert abs(stored.decided_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert stored.as_dict() == {
        "id": stored.id,
        "uri": uri("a"),
        "etag": "e1",
        "decision": "reject",
        "reviewer": "alice",
        "role": "reviewer",
        "note": "see the corner",
        "reason": "nudity",
        "rule": None,
        "override": False,
        "second_look": False,
        "decided_at": stored.decided_at.isoformat(),
    }
    assert uri("a") not in claimed_by(database) and claimed_by(database)[uri("b")] == "alice"
    assert counted(store) == {"left": 3, "left_capped": False, "done": 1, "mine": 1, "second_looks": 0, "escalated": 0}
    assert counted(store, "bob")["mine"] == 0
    assert store.queue_size() == 3
    assert names(store.claim(BOB, 10)) == ["d", "c"]
    assert list(store.decisions()) == [(stored, True)]


def test_a_decided_item_annotated_again_stays_decided(open_store: OpenStore, database: str) -> None:
    """A new record of the same object (another pipeline signature) has no queue state of its own yet:
    the decision log says the item is decided."""
    store = open_store(*four())
    store.claim(ALICE, 1)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    write(database, record("a", 0.97, signature="sig-2"))
    assert names(store.claim(BOB, 10)) == ["b", "d", "c"]


def test_a_decided_audit_sample_item_annotated_again_stays_decided(open_store: OpenStore, database: str) -> None:
    """As for flagged items: the audit sample asks the decision log, not the new row's empty state."""
    store = open_store(*[record(f"q{i}", 0.2, flagged=False) for i in range(3)], audit_rate=1.0)
    assert names(store.claim(ALICE, 10)) == ["q0", "q1", "q2"]
    store.decide(ALICE, uri("q0"), "e1", Decision.APPROVE)
    store.release("alice")
    write(database, record("q0", 0.2, flagged=False, signature="sig-2"))
    assert names(store.claim(BOB, 10)) == ["q1", "q2"]


def test_decisions_on_others_claims_unknown_items_and_others_decisions_are_refused(open_store: OpenStore) -> None:
    store = open_store(*four())
    store.claim(ALICE, 1)
    with pytest.raises(HeldByAnother):
        store.decide(BOB, uri("a"), "e1", Decision.APPROVE)
    with pytest.raises(NotFound):
        store.decide(ALICE, uri("a"), "another-etag", Decision.APPROVE)
    with pytest.raises(NotFound):
        store.decide(ALICE, uri("nowhere"), "e1", Decision.APPROVE)
    first = store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    # the decider may change their own mind; anyone else meets the standing decision
    again = store.decide(ALICE, uri("a"), "e1", Decision.REJECT)
    assert again.id > first.id and not again.override
    with pytest.raises(Conflict) as conflict:
        store.decide(BOB, uri("a"), "e1", Decision.APPROVE)
    assert conflict.value.standing == again
    with pytest.raises(Conflict):
        store.decide(CAROL, uri("a"), "e1", Decision.APPROVE)  # a lead too, unless overriding
    with pytest.raises(NotLead):
        store.decide(BOB, uri("a"), "e1", Decision.APPROVE, override=True)
    store.release("alice")
    store.claim(BOB, 1)
    store.decide(BOB, uri("b"), "e1", Decision.APPROVE)
    with pytest.raises(Conflict):  # whichever way the names sort
        store.decide(ALICE, uri("b"), "e1", Decision.REJECT)
    assert counted(store)["mine"] == 1 and counted(store)["done"] == 2 and counted(store)["left"] == 2


def test_a_leads_override_is_recorded_as_such_and_becomes_the_standing_decision(open_store: OpenStore) -> None:
    store = open_store(*four())
    store.claim(ALICE, 1)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    overridden = store.decide(CAROL, uri("a"), "e1", Decision.REJECT, note="no", override=True)
    assert (overridden.decision, overridden.reviewer, overridden.role, overridden.override) == (
        "reject",
        "carol",
        "lead",
        True,
    )
    assert counted(store, "carol")["mine"] == 1 and counted(store, "alice")["mine"] == 0
    assert counted(store)["done"] == 1
    assert [stored for stored, _ in store.decisions()] == [overridden]
    with pytest.raises(NotFound):  # alice's decision no longer stands: nothing of hers to undo
        store.undo(ALICE)


def test_escalated_items_go_to_the_leads_queue_where_a_leads_decision_is_final(open_store: OpenStore) -> None:
    store = open_store(*four())
    store.claim(ALICE, 1)
    escalated = store.decide(ALICE, uri("a"), "e1", Decision.ESCALATE, note="not sure")
    assert escalated.decision == "escalate"
    assert names(store.claim(BOB, 10)) == ["b", "d", "c"]
    store.release("bob")
    with pytest.raises(NotLead):
        store.claim(ALICE, 10, queue=Queue.LEADS)
    assert counted(store) == {"left": 3, "left_capped": False, "done": 0, "mine": 1, "second_looks": 0, "escalated": 1}
    assert store.counts("carol", queue=Queue.LEADS).left == 1
    (item,) = store.claim(CAROL, 10, queue=Queue.LEADS).items
    assert (item.uri, item.reason) == (uri("a"), "escalated")
    final = store.decide(CAROL, uri("a"), "e1", Decision.REJECT)
    assert not final.override and not final.second_look
    assert counted(store, "carol") == {
        "left": 3,
        "left_capped": False,
        "done": 1,
        "mine": 1,
        "second_looks": 0,
        "escalated": 0,
    }
    assert store.claim(CAROL, 10, queue=Queue.LEADS).items == []
    assert store.counts("carol", queue=Queue.LEADS).left == 0


def test_a_sampled_decision_gets_a_second_look_from_another_reviewer(open_store: OpenStore) -> None:
    store = open_store(*four(), second_look_rate=1.0)
    store.claim(ALICE, 1)
    first = store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    assert counted(store) == {"left": 3, "left_capped": False, "done": 1, "mine": 1, "second_looks": 1, "escalated": 0}
    assert names(store.claim(ALICE, 10)) == ["b", "d", "c"]  # never back to its first reviewer
    store.release("alice")
    looked = store.claim(BOB, 1).items[0]
    assert (looked.uri, looked.reason) == (uri("a"), "second-look")
    second = store.decide(BOB, uri("a"), "e1", Decision.REJECT, note="missed it")
    assert second.second_look and not second.override
    assert counted(store) == {"left": 3, "left_capped": False, "done": 1, "mine": 1, "second_looks": 0, "escalated": 0}
    assert counted(store, "bob")["mine"] == 0  # the first look still stands
    assert [stored for stored, _ in store.decisions()] == [first, second]
    with pytest.raises(Conflict):  # the second look was taken: bob meets alice's standing decision
        store.decide(BOB, uri("a"), "e1", Decision.APPROVE)
    # a lead's decisions are never sampled
    store.claim(CAROL, 1)
    assert store.decide(CAROL, uri("b"), "e1", Decision.APPROVE).role == "lead"
    assert counted(store)["second_looks"] == 0


def test_the_second_look_sample_is_chosen_by_the_uri(open_store: OpenStore) -> None:
    made = [record(f"s{i}", 0.9) for i in range(12)]
    store = open_store(*made, second_look_rate=0.5)
    half = audit_threshold(0.5)
    sampled = {r.uri for r in made if second_hash(r.uri) < half}
    assert 0 < len(sampled) < len(made)
    store.claim(ALICE, 20)
    for r in made:
        store.decide(ALICE, r.uri, "e1", Decision.APPROVE)
    assert {item.uri for item in store.claim(BOB, 20).items} == sampled
    assert counted(store)["second_looks"] == len(sampled)


def test_agreement_and_reviewer_stats_count_first_and_second_looks_by_auto_and_people(
    open_store: OpenStore,
) -> None:
    store = open_store(*four(), auto_reject={"nsfw": 0.95}, auto_audit_rate=1.0, second_look_rate=1.0)
    assert store.agreement() == [Agreement("auto", 0, 0), Agreement("people", 0, 0)]
    assert [a.rate for a in store.agreement()] == [None, None]
    assert store.sweep() == 1  # auto rejects a, and a waits for a second look
    assert names(store.claim(ALICE, 10)) == ["a", "b", "d", "c"]
    store.decide(ALICE, uri("a"), "e1", Decision.REJECT)  # agrees with auto
    store.decide(ALICE, uri("b"), "e1", Decision.APPROVE)
    store.decide(ALICE, uri("d"), "e1", Decision.APPROVE)
    store.release("alice")
    assert names(store.claim(BOB, 10)) == ["b", "d", "c"]
    store.decide(BOB, uri("b"), "e1", Decision.REJECT)  # disagrees with alice
    store.decide(BOB, uri("d"), "e1", Decision.APPROVE)  # agrees with alice
    assert store.agreement() == [Agreement("auto", 1, 1), Agreement("people", 2, 1)]
    assert [a.rate for a in store.agreement()] == [1.0, 0.5]
    # alice's first looks at b and d stand (her second look at a does not); auto's at a
    assert store.reviewer_stats() == [
        ReviewerStats("alice", standing=2, last_hour=3, total=3, overrides=0, second_looks=1),
        ReviewerStats("auto", standing=1, last_hour=1, total=1, overrides=0, second_looks=0),
        ReviewerStats("bob", standing=0, last_hour=2, total=2, overrides=0, second_looks=2),
    ]


@pytest.mark.parametrize(("auto_audit_rate", "second_look_rate", "looked"), [(1.0, 0.0, True), (0.0, 1.0, False)])
def test_the_auto_reject_bands_decisions_are_sampled_at_their_own_rate(
    open_store: OpenStore, auto_audit_rate: float, second_look_rate: float, looked: bool
) -> None:
    store = open_store(
        *four(), auto_reject={"nsfw": 0.95}, auto_audit_rate=auto_audit_rate, second_look_rate=second_look_rate
    )
    assert store.sweep() == 1
    assert names(store.claim(BOB, 10)) == (["a"] if looked else []) + ["b", "d", "c"]
    assert counted(store)["second_looks"] == int(looked)
    ((auto, current),) = store.decisions()
    assert (auto.uri, auto.decision, auto.reviewer, auto.role, auto.rule) == (
        uri("a"),
        "reject",
        "auto",
        "auto",
        "nsfw >= 0.95",
    )
    assert not auto.second_look and not auto.override and current


def test_undo_takes_back_the_reviewers_own_last_standing_decision(open_store: OpenStore, database: str) -> None:
    store = open_store(*four())
    with psycopg.connect(database) as conn:  # ids as a busy log has them: past CPython's cached small ints
        conn.execute("ALTER SEQUENCE imagemill_reviews_id_seq RESTART WITH 1000000")
    store.claim(ALICE, 2)
    first = store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    store.decide(ALICE, uri("b"), "e1", Decision.REJECT, note="b")
    with pytest.raises(NotFound):
        store.undo(BOB)
    undone, item = store.undo(ALICE)
    assert (undone.uri, undone.decision, undone.note) == (uri("b"), "reject", "b")
    assert item is not None and (item.uri, item.etag, item.reason, item.key) == (uri("b"), "e1", "flagged", 0.91)
    assert item.labels == [Label("violence", 0.91, 0.8), Label("nsfw", 0.62, 0.5)]
    assert claimed_by(database)[uri("b")] == "alice"  # theirs again for a lease
    assert counted(store) == {"left": 3, "left_capped": False, "done": 1, "mine": 1, "second_looks": 0, "escalated": 0}
    assert names(store.claim(BOB, 10)) == ["d", "c"]
    assert [stored for stored, _ in store.decisions()] == [first]
    log = [stored.decision for stored, _ in store.decisions(everything=True)]
    assert log == ["approve", "reject", "undo"]
    assert store.undo(ALICE)[0] == first
    with pytest.raises(NotFound):
        store.undo(ALICE)
    assert counted(store)["left"] == 4 and counted(store)["done"] == 0
    # a decision taken back stands for nobody: another reviewer may decide the item
    store.release("alice")
    assert store.decide(BOB, uri("a"), "e1", Decision.REJECT).reviewer == "bob"
    assert counted(store, "bob")["mine"] == 1 and counted(store)["mine"] == 0


def test_undoing_a_second_look_returns_the_item_to_the_second_looks(open_store: OpenStore) -> None:
    store = open_store(*four(), second_look_rate=1.0)
    store.claim(ALICE, 1)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    store.claim(BOB, 1)
    store.decide(BOB, uri("a"), "e1", Decision.REJECT)
    undone, item = store.undo(BOB)
    assert undone.second_look and item is not None and item.reason == "second-look"
    assert counted(store)["second_looks"] == 1 and counted(store, "alice")["mine"] == 1
    # the look taken back is open again: a new second look, not a conflict with alice's decision
    assert store.decide(BOB, uri("a"), "e1", Decision.APPROVE).second_look
    store.undo(BOB)
    assert store.undo(ALICE)[0].decision == "approve"
    assert counted(store)["second_looks"] == 0 and counted(store)["left"] == 4


def test_a_changed_first_decision_gets_a_second_look_of_its_own(open_store: OpenStore) -> None:
    store = open_store(*four(), second_look_rate=1.0)
    store.claim(ALICE, 1)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    # her own decision again, before the look: a new first look, still awaiting its second
    assert not store.decide(ALICE, uri("a"), "e1", Decision.APPROVE).second_look
    assert counted(store)["second_looks"] == 1
    store.claim(BOB, 1)
    store.decide(BOB, uri("a"), "e1", Decision.REJECT)
    store.decide(ALICE, uri("a"), "e1", Decision.REJECT)  # alice changes her mind after the look
    assert counted(store)["second_looks"] == 1
    assert names(store.claim(BOB, 1)) == ["a"]
    assert store.decide(BOB, uri("a"), "e1", Decision.REJECT).second_look


@pytest.mark.parametrize("name", ["bob", "zoe"])
def test_every_reviewers_decisions_are_sampled_at_the_peoples_rate(open_store: OpenStore, name: str) -> None:
    """Whatever the name (the auto-reject bands' `auto` sorts between these), a person's decision is
    sampled at the second-look rate, not the bands' audit rate."""
    store = open_store(*four(), second_look_rate=1.0, auto_audit_rate=0.0)
    store.claim(Reviewer(name), 1)
    store.decide(Reviewer(name), uri("a"), "e1", Decision.APPROVE)
    assert counted(store)["second_looks"] == 1
    store.claim(ALICE, 1)  # whose name sorts before theirs
    assert store.decide(ALICE, uri("a"), "e1", Decision.REJECT).second_look


class Overtaken(ReviewStore):
    """A store whose undo is overtaken, between finding the decision and locking its item, by another
    change to the item on another replica: the same reviewer's other undo (a double click), or a lead's
    override."""

    def __init__(self, url: str, other: ReviewStore, change: Callable[[ReviewStore, str, str], object]) -> None:
        super().__init__(url, other.bands, lease_s=LEASE_S)
        self.other: ReviewStore | None = other
        self.change = change

    def _lock_item(self, conn: psycopg.Connection, uri: str, etag: str) -> Any:
        if self.other is not None:
            self.other, other = None, self.other
            self.change(other, uri, etag)
        return super()._lock_item(conn, uri, etag)


@pytest.mark.parametrize(
    ("change", "standing"),
    [
        (lambda other, uri, etag: other.undo(ALICE), "a"),
        (lambda other, uri, etag: other.decide(CAROL, uri, etag, Decision.REJECT, override=True), "ab"),
    ],
    ids=["undone-twice", "overridden"],
)
def test_an_undo_overtaken_by_another_change_takes_nothing_back(
    open_store: OpenStore, database: str, change: Callable[[ReviewStore, str, str], object], standing: str
) -> None:
    store = open_store(*four())
    store.claim(ALICE, 2)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    store.decide(ALICE, uri("b"), "e1", Decision.APPROVE)
    late = Overtaken(database, store, change)
    try:
        with pytest.raises(NotFound, match="just changed"):
            late.undo(ALICE)
    finally:
        late.close()
    assert sorted(stored.uri for stored, _ in store.decisions()) == [uri(n) for n in standing]
    assert counted(store)["done"] == len(standing) and counted(store)["left"] == 4 - len(standing)


def test_counts_never_go_below_zero_before_the_next_recount(open_store: OpenStore, database: str) -> None:
    """Records written after the last recount are not in its base yet: deciding them must not make
    the count of what is left negative (the next recount catches up)."""
    store = open_store()
    write(database, *four())
    store.claim(ALICE, 2)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    assert counted(store)["left"] == 0 and store.queue_size() == 0
    store.recount()
    assert counted(store)["left"] == 3 and store.queue_size() == 3


def test_counts_never_go_below_zero_when_undone_items_left_the_recount(open_store: OpenStore, database: str) -> None:
    """Decided items whose records a re-run rewrote as errors drop out of the recount (they are not
    live) yet can still be undone: each undo's delta takes one from counts the recount no longer
    holds (done, the reviewer's, second looks, escalated). They show zero until the next recount."""
    store = open_store(*four(), second_look_rate=1.0)
    store.claim(ALICE, 2)
    store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)  # sampled: waits for a second look
    store.decide(ALICE, uri("b"), "e1", Decision.ESCALATE)
    write(database, record("a", 0.97, error=True), record("b", 0.62, 0.91, error=True))  # same keys, now errors
    store.recount()
    zero = {"done": 0, "mine": 0, "second_looks": 0, "escalated": 0}
    assert {key: counted(store)[key] for key in zero} == zero
    store.undo(ALICE)
    store.undo(ALICE)
    assert {key: counted(store)[key] for key in zero} == zero
    assert [s.standing for s in store.reviewer_stats()] == [0]
    store.recount()
    assert {key: counted(store)[key] for key in zero} == zero


def test_a_replaced_objects_old_record_and_decision_are_not_current(open_store: OpenStore, database: str) -> None:
    store = open_store(*four())
    store.claim(ALICE, 1)
    old = store.decide(ALICE, uri("a"), "e1", Decision.REJECT)
    assert store.has_record(uri("a")) and store.has_record(uri("a"), "e1")
    assert not store.has_record(uri("a"), "e2") and not store.has_record(uri("nowhere"))
    write(database, record("a", 0.97, etag="e2"))
    assert store.has_record(uri("a"), "e2") and not store.has_record(uri("a"), "e1")
    assert list(store.decisions()) == [(old, False)]
    assert names(store.claim(BOB, 1)) == ["a"] and store.claim(BOB, 1).items[0].etag == "e2"
    with pytest.raises(NotFound):
        store.decide(ALICE, uri("a"), "e1", Decision.APPROVE)
    with pytest.raises(NotFound, match="replaced or deleted; nothing to undo"):  # what the page says
        store.undo(ALICE)


def test_a_recount_already_running_on_another_replica_is_not_repeated(open_store: OpenStore, database: str) -> None:
    """The replicas agree on the recount's lock: "imgrevw" in ASCII plus one (the set-up's is "imgrevw"),
    a key that an upgrade must keep for old and new replicas to exclude each other."""
    store = open_store(*four())
    recount_key = int.from_bytes(b"imgrevw") + 1
    with psycopg.connect(database) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s)", (recount_key - 1,))
        assert store.recount() is True  # another replica's set-up stops no recount
        other.execute("SELECT pg_advisory_xact_lock(%s)", (recount_key,))
        assert store.recount() is False
    assert store.recount() is True
    assert store.recount(older_than_s=60) is False  # a count this young will do


# -- the audit sample -------------------------------------------------------------------------------


def test_the_audit_sample_is_the_unflagged_uris_whose_hash_is_under_the_rate(open_store: OpenStore) -> None:
    # stored unflagged under an earlier, higher threshold: nsfw crossed today's, yet they were never flagged
    quiet = [record(f"q{i}", 0.6, flagged=False) for i in range(12)]
    store = open_store(record("f", 0.9), *quiet, audit_rate=0.5)
    sampled = {r.uri for r in quiet if audit_hash(r.uri) < AUDIT_SPACE // 2}
    assert 0 < len(sampled) < len(quiet)
    items = store.claim(ALICE, 50).items
    assert {i.uri for i in items if i.reason == "audit"} == sampled
    assert [i.reason for i in items if i.uri == uri("f")] == ["flagged"]
    assert counted(store)["left"] == 1 + len(sampled)
    store.release("alice")
    # a label filter is about flagged items where the label crossed: the sample is left out
    assert names(store.claim(ALICE, 50, Filters(label="nsfw"))) == ["f"]


def test_the_audit_threshold_is_the_rates_share_of_the_32_bit_hash() -> None:
    assert AUDIT_SPACE == 2**32
    assert [audit_threshold(rate) for rate in (0.0, 0.25, 0.5, 1.0)] == [0, 2**30, 2**31, 2**32]
    assert audit_threshold(0.01) == 42949672
    assert audit_threshold(1.5) == 2**32  # never more than the whole space


def test_counts_and_a_stored_decision_read_as_the_api_shows_them() -> None:
    counts = Counts(left=3, done=2, mine=1, second_looks=4, escalated=5, left_capped=True)
    assert counts.as_dict() == {
        "left": 3,
        "left_capped": True,
        "done": 2,
        "mine": 1,
        "second_looks": 4,
        "escalated": 5,
    }
    assert Label("nsfw", 0.5, 0.5).as_dict()["crossed"] is True
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stored = Stored(1, "u", "e", "approve", "alice", "reviewer", None, None, None, False, True, at)
    assert stored.as_dict()["decided_at"] == "2026-01-02T03:04:05+00:00" and stored.as_dict()["second_look"] is True
