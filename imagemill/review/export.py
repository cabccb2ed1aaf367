"""The review decisions as a file: `decisions.csv` or `decisions.jsonl`, the decisions that stand or
the whole log, each with whether its (uri, etag) is still the object's current version, written
beside the target and moved into place when complete.

`imagemill review export` calls it; the rows come from `review.store`.
"""

import csv
import json
import os
from pathlib import Path

from imagemill.core.errors import UserError
from imagemill.core.settings import Settings
from imagemill.review.db import DATABASE_DOWN
from imagemill.review.store import Bands, ReviewStore

EXPORT_COLUMNS = (
    "uri",
    "etag",
    "decision",
    "reviewer",
    "role",
    "override",
    "second_look",
    "reason",
    "rule",
    "note",
    "decided_at",
    "current",
)


def check_out(out: Path) -> None:
    """UserError, one line, for an --out that cannot be written: another suffix than .csv or
    .jsonl, a folder that does not exist or cannot be written, a folder in its place."""
    if out.suffix.lower() not in {".csv", ".jsonl"}:
        raise UserError(f"--out {out}: expected a .csv or .jsonl file")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"--out {out}: the folder {folder} does not exist")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {folder} cannot be written")


def export_decisions(sink: str, out: Path, everything: bool, settings: Settings | None = None) -> int:
    """Write the decisions of the review queue over `sink` to `out`; how many were written.
    UserError, one line, for an unusable --out, a database that cannot be reached or that went away
    while writing (no file is left under the real name then)."""
    check_out(out)
    store = ReviewStore(sink, Bands(thresholds=(settings or Settings()).moderation_thresholds))
    store.setup(queue=False)  # the decisions only: the queue's indexes are the app's to make
    partial = out.with_name(f".{out.name}.partial")
    count = 0
    suffix = out.suffix.lower()
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle) if suffix == ".csv" else None
            if writer is not None:
                writer.writerow(EXPORT_COLUMNS)
            for stored, current in store.decisions(everything):
                row = {**stored.as_dict(), "current": current}
                if writer is not None:
                    writer.writerow([_cell(row[column]) for column in EXPORT_COLUMNS])
                else:
                    handle.write(
                        json.dumps({column: row[column] for column in EXPORT_COLUMNS}, ensure_ascii=False) + "\n"
                    )
                count += 1
        partial.replace(out)  # a failed export leaves no half-written file under the real name
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    except DATABASE_DOWN as exc:
        raise UserError(f"reading the decisions failed: {' '.join(str(exc).split())}") from None
    finally:
        partial.unlink(missing_ok=True)
        store.close()
    return count


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
