"""Every way an image or a run can fail, named once.

`ErrorKind` values end up in records as data; the exception classes are faults raised in code.
"""

from enum import StrEnum


class ErrorKind(StrEnum):
    """Why one image has no annotation. Stored in `record.error.kind`."""

    NOT_FOUND = "not_found"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    FETCH_FAILED = "fetch_failed"
    MODEL_FAILED = "model_failed"
    WORKER_LOST = "worker_lost"  # its chunk killed its worker every time it was delivered
    BAD_REFERENCE = "bad_reference"  # a manifest line that names no readable image (its record's uri names the line)
    NOT_WRITTEN = "not_written"  # the sink cannot hold this record (s3tags:// and an image not on S3)


class ImageError(Exception):
    """One image cannot be used; the engine turns it into an error record, never a failed run."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class UserError(Exception):
    """A fault the user can fix (bad source, option or model); the CLI prints it in one line."""

    exit_code = 2


class SourceError(UserError):
    """The SOURCE argument names nothing usable."""


class ModelLoadError(UserError):
    """A configured model cannot be loaded."""

    exit_code = 3
