"""The mutation targets: each module behind a README guarantee, the functions whose mutants count, and
the fast targeted tests that must kill them (`python -m tools.mutation --modules NAME`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One guarantee module: the functions whose mutants count, and the tests that must kill them."""

    path: str
    functions: frozenset[str]
    tests: str  # pytest arguments


TARGETS = {
    "moderation": Target(
        "imagemill/pipeline/models/moderation.py",
        frozenset({"_judge"}),
        "--noconftest tests/test_models.py -k judging",
    ),
    "decode": Target(
        "imagemill/pipeline/prepare/decode.py",
        frozenset({"decode", "from_image", "_check_pixels", "_open", "_load"}),
        "--noconftest tests/test_decode.py",
    ),
    "storage-limits": Target(
        "imagemill/core/images.py",
        frozenset({"read", "_too_large", "_within_limit", "_read_file", "_read_s3", "read_at_most"}),
        # the stubs test: boto3's type stubs are a dev dependency, imported only `if TYPE_CHECKING`
        "tests/test_byte_limits.py tests/test_install.py::test_every_module_imports_without_the_dev_only_type_stubs"
        " -k 'not real_run'",
    ),
    "message-validation": Target(
        "imagemill/core/schemas.py",
        frozenset({"ChunkMessage", "ImageRef", "_problem_only_when_set"}),
        "--noconftest tests/test_chunk_message.py",
    ),
    "incremental-skip": Target(
        "imagemill/pipeline/sources/incremental.py",
        frozenset({"mark_existing", "skip_existing"}),
        "--noconftest tests/test_incremental_skip.py",
    ),
    # every method of the registry and the Job it reads back; the Lua scripts are strings, which
    # cosmic-ray does not mutate (the tests break them by hand: the chunk-done dedup, the done check)
    "job-registry": Target(
        "imagemill/core/jobs.py",
        frozenset(
            {
                "from_hash",
                "expires_at",
                "processed",
                "new_job_id",
                "__init__",
                "key",
                "job_keys",
                "create",
                "claim",
                "heartbeat",
                "take_over",
                "get",
                "recent",
                "prune",
                "state",
                "add_queued",
                "end_listing",
                "chunk_started",
                "_set",
                "chunk_done",
                "begin_chunk",
                "end_chunk",
                "_increments",
                "begin_attempt",
                "end_attempt",
                "publish_signature",
                "signature_for",
                "count_rejected",
                "rejected",
                "chunk_cancelled",
                "cancel",
                "fail",
                "_transition",
                "_transaction",
                "_text",
            }
        ),
        "tests/test_job_registry.py tests/test_job_retention.py",
    ),
    "postgres-writes": Target(
        "imagemill/core/sinks/postgres.py",
        frozenset(
            {
                "write",
                "_row",
                "_without_nul",
                "_upsert_sql",
                "_stored_key",
                "_stored_ok_keys",
                "existing_keys",
                "_ensure_schema",
                "_check_version",
            }
        ),
        # with the migration and view tests of test_current_records (not its 30 s resubmission run)
        # and the sink contract's PostgreSQL case
        "tests/test_postgres_store.py tests/test_current_records.py tests/test_sink_contract.py"
        " -k 'not resubmit and (postgresql or not contract)'",
    ),
    "file-writes": Target(
        "imagemill/core/sinks/files.py",
        frozenset(
            {
                "__init__",
                "existing_keys",
                "keep",
                "close",
                "abort",
                "_open",
                "_close",
                "write",
                "_flush",
                "write_table",
                "parquet_row",
                "parquet_schema",
                "writer_options",
                "open_file_sink",
                "encode_records",
            }
        ),
        # and the sink contract's local-file cases
        "--noconftest tests/test_record_files.py tests/test_store_capabilities.py tests/test_sink_contract.py"
        " -k '(not s3 and not sink) or local_'",
    ),
    "object-writes": Target(
        "imagemill/core/sinks/objects.py",
        frozenset(
            {
                "__init__",
                "from_url",
                "key_for",
                "path_for",
                "write",
                "chunk_object_name",
                "check_format",
                "split_format",
                "normalise_prefix",
                "_write_atomically",
                "_fsync_directory",
            }
        ),
        # not the read-paging test (13 s, writes nothing); the stubs test for its `if TYPE_CHECKING` import
        # and the sink contract's directory and S3 cases
        "tests/test_object_sinks.py tests/test_install.py::test_every_module_imports_without_the_dev_only_type_stubs"
        " tests/test_sink_contract.py -k 'not more_than_a_thousand and (directory_ or s3_ or not contract)'",
    ),
    # the review queue's claims and decisions, against the store's own specification (no HTTP, one
    # database for the module: about 6 s a run, where test_review_api's selection took 50 s); its SQL
    # is strings, which cosmic-ray does not mutate (the claim upsert's guard is broken by hand: the
    # forced race, in both files)
    "review-claims": Target(
        "imagemill/review/store.py",
        frozenset(
            {
                "audit_threshold",
                "as_dict",
                "claim",
                "_candidates",
                "_take",
                "_branches",
                "_filtered",
                "renew",
                "_standing",
                "_state_after",
                "_item",
                "queue_size",
                "counts",
                "has_record",
                "decide",
                "undo",
                "_one_item",
                "_append",
                "decisions",
            }
        ),
        "--noconftest tests/test_review_store.py",
    ),
    # which faults a retry may mend; not `on_failure` (it needs a worker: the slow bucket-deleted test)
    "retries": Target(
        "imagemill/worker/retries.py",
        frozenset({"permanent_reason", "classified", "backoff_s", "expected_backoff_s"}),
        "--noconftest tests/test_permanent_errors.py -k 'not deleted_mid_job'",
    ),
    # the scores against the model's own logits (tags and retag share this scorer, so comparing the two
    # cannot tell a wrong one), top-k and threshold, the options in the signature, tags = retag
    "zero-shot": Target(
        "imagemill/pipeline/models/zero_shot.py",
        frozenset({"signature_options", "embed_vocabulary", "__init__", "top", "tags", "tags_of"}),
        "tests/test_models.py tests/test_retag.py::test_the_same_embedding_gets_the_same_labels_from_tags_and_retag"
        " -k 'tag or signature'",
    ),
}
