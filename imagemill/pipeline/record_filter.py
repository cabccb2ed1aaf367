"""`--where` conditions on records: a small filter language, `field=value` or `field!=value`,
several conditions all required.

Fields: `flagged` (true/false), `error` (none or an error kind), `tag` (a tag the record carries),
`format` (the decoded image format, e.g. jpeg) and `job` (the job id). A record that lacks the field
(no moderation for `flagged`, no tags for `tag`) never matches `=` and always matches `!=`.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Record

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}
_KINDS = {kind.value for kind in ErrorKind}


def _flagged(value: str) -> Callable[[Record], bool]:
    word = value.lower()
    if word not in _TRUE | _FALSE:
        raise UserError(f"--where flagged={value}: expected true or false")
    wanted = word in _TRUE
    return lambda r: r.moderation is not None and r.moderation.flagged == wanted


def _error(value: str) -> Callable[[Record], bool]:
    word = value.lower()
    if word == "none":
        return lambda r: r.error is None
    if word not in _KINDS:
        raise UserError(f"--where error={value}: expected none or one of {', '.join(sorted(_KINDS))}")
    return lambda r: r.error is not None and r.error.kind.value == word


def _tag(value: str) -> Callable[[Record], bool]:
    return lambda r: r.tags is not None and any(label.tag == value for label in r.tags.labels)


def _format(value: str) -> Callable[[Record], bool]:
    word = value.upper()
    return lambda r: r.image is not None and (r.image.format or "").upper() == word


def _job(value: str) -> Callable[[Record], bool]:
    return lambda r: r.job_id == value


FIELDS: dict[str, Callable[[str], Callable[[Record], bool]]] = {
    "flagged": _flagged,
    "error": _error,
    "tag": _tag,
    "format": _format,
    "job": _job,
}


@dataclass(frozen=True)
class Where:
    """The conjunction of parsed conditions: `where(record)` says whether the record passes."""

    conditions: tuple[tuple[Callable[[Record], bool], bool], ...] = ()

    def __call__(self, record: Record) -> bool:
        return all(matches(record) != negated for matches, negated in self.conditions)


def parse_where(texts: Sequence[str]) -> Where:
    """`["flagged=false", "tag!=nsfw"]` -> a `Where`; a UserError (one line) names a condition
    that is not `field=value`, an unknown field, or a value the field cannot take."""
    conditions = []
    for text in texts:
        name, op, value = text.partition("=")
        negated = name.endswith("!")
        name = name.removesuffix("!").strip()
        if not op or not name or not value.strip():
            raise UserError(f"--where {text!r}: expected field=value or field!=value")
        make = FIELDS.get(name.lower())
        if make is None:
            raise UserError(f"--where {text!r}: unknown field {name!r}; choose from {', '.join(FIELDS)}")
        conditions.append((make(value.strip()), negated))
    return Where(tuple(conditions))
