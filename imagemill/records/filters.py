"""`--where` conditions on records: a small expression language, parsed here (no `eval`), every
fault one line naming where it is.

    moderation.nsfw < 0.2 and not duplicate and (tag = dog or tags.cat >= 0.3)

Conditions are `field OP value` (OP: = == != < <= > >=) or a flag standing alone, joined by
`and`, `or`, `not` and parentheses; several `--where` options must all hold. Fields:

- `flagged` (flag; or = true/false), `error` (flag: any error; or = none / an error kind),
  `duplicate` and `representative` (flags: dedup's mark in the record, `imagemill dedup
  --write-back`, or dedup's groups file given with `--duplicates`);
- `tag` (= a tag the record carries), `tags.NAME` (that tag's score; 0 when the record's tags lack
  it), `moderation.LABEL` (that label's score), `score.NAME` (a probe's score, `imagemill score`),
  `quality.NAME` (an image statistic: brightness, contrast, blur, low_information);
- `format`, `job`, `caption` (= text, or `~` contains), `width`, `height`, `bytes`,
  `processed_at` (a date or ISO time, compared in UTC).

A record that lacks a field (no moderation for `moderation.nsfw`, an error record for `width`)
matches no comparison on it, and so every `!=` and every `not` of one.
"""

import json
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Record

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}
_KINDS = {kind.value for kind in ErrorKind}
_TOKEN = re.compile(r"\s*(?:(\()|(\))|(<=|>=|==|!=|=|<|>|~)|\"([^\"]*)\"|'([^']*)'|([^\s()<>=!~\"']+))")
_WORDS = frozenset({"and", "or", "not"})
_PREFIXED = ("tags", "moderation", "score", "quality")
_BOOLEAN_STATISTICS = ("quality.low_information",)

Test = Callable[[Record], bool]
Value = Any  # what a field reads from a record: a number, a string, a bool, a time, or None (absent)


class Roles:
    """Dedup's groups as `--where` reads them: uris that are a group's representative, and those
    that are a member beside it (`duplicate`). Empty until `--duplicates` gives a groups file."""

    def __init__(self, representatives: Collection[str] = (), duplicates: Collection[str] = ()) -> None:
        self.representatives = frozenset(representatives)
        self.duplicates = frozenset(duplicates)


def read_roles(path: Path) -> Roles:
    """Dedup's groups file (`imagemill dedup --out groups.jsonl`) as `Roles`: each line's
    representative, and its other members as duplicates. UserError (one line) for a file that
    cannot be read or a line that is not a group."""
    representatives: set[str] = set()
    duplicates: set[str] = set()
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    found = json.loads(line)
                    representative = found["representative"]
                    members = [member["uri"] for member in found["members"]]
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"--duplicates {path}: line {number} is not a group of imagemill dedup") from None
                representatives.add(representative)
                duplicates.update(uri for uri in members if uri != representative)
    except OSError as exc:
        raise UserError(f"--duplicates {path}: cannot read it ({exc.strerror or exc})") from None
    return Roles(representatives, duplicates)


@dataclass(frozen=True)
class Where:
    """The parsed conditions: `where(record)` says whether the record passes all of them."""

    tests: tuple[Test, ...] = ()
    texts: tuple[str, ...] = ()
    roles: Roles | None = None  # dedup's groups from a file (`--duplicates`), when a condition names a role
    names_roles: bool = False  # a condition names duplicate or representative

    def __call__(self, record: Record) -> bool:
        return all(test(record) for test in self.tests)

    @property
    def needs_roles(self) -> bool:
        return self.roles is not None

    def unmarked(self, record: Record) -> bool:
        """Whether a role is read from a record that dedup never marked (no `--duplicates` file and
        no `dedup` field): it counts as no duplicate, and the export says how many there were."""
        return self.names_roles and self.roles is None and record.dedup is None


def parse_where(texts: Sequence[str], roles: Roles | None = None) -> Where:
    """`["moderation.nsfw < 0.2 and not duplicate"]` -> a `Where`; a UserError (one line) names the
    expression and what is wrong: an unknown field, a value the field cannot take, a missing
    operand or parenthesis. `duplicate` and `representative` read `roles` (dedup's groups file)
    when given, else each record's own mark (`imagemill dedup --write-back`)."""
    tests = []
    named_roles = False
    for text in texts:
        parser = _Parser(_legacy(text), roles)
        parser.text = text
        tests.append(parser.parse())
        named_roles = named_roles or parser.named_roles
    return Where(tuple(tests), tuple(texts), roles if named_roles else None, named_roles)


class _Parser:
    """Recursive descent over the tokens of one expression: or ▸ and ▸ not ▸ atom."""

    def __init__(self, text: str, roles: Roles | None) -> None:
        self.text = text
        self.roles = roles
        self.named_roles = False
        self.tokens = _tokens(text, self.fail)
        self.at = 0

    def fail(self, why: str) -> UserError:
        return UserError(f"--where {self.text!r}: {why}")

    def parse(self) -> Test:
        if not self.tokens:
            raise self.fail("an empty condition")
        test = self._or()
        if self.at < len(self.tokens):
            raise self.fail(f"unexpected {self.tokens[self.at][1]!r}; join conditions with and / or")
        return test

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _word(self, word: str) -> bool:
        token = self._peek()
        if token is not None and token[0] == "name" and token[1].lower() == word:
            self.at += 1
            return True
        return False

    def _or(self) -> Test:
        parts = [self._and()]
        while self._word("or"):
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _and(self) -> Test:
        parts = [self._not()]
        while self._word("and"):
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _not(self) -> Test:
        if self._word("not"):
            inner = self._not()
            return lambda r: not inner(r)
        return self._atom()

    def _atom(self) -> Test:
        token = self._peek()
        if token is None:
            raise self.fail("a condition is missing at the end")
        kind, text = token
        if kind == "(":
            self.at += 1
            inner = self._or()
            if self._peek() is None or self._peek() != (")", ")"):
                raise self.fail("a ( is not closed")
            self.at += 1
            return inner
        if kind != "name" or text.lower() in _WORDS:
            raise self.fail(f"expected a condition, got {text!r}")
        self.at += 1
        name = text.lower()
        read = self._field(name)
        following = self._peek()
        if following is None or following[0] != "op":
            return self._flag(name, read)
        self.at += 1
        op = following[1]
        value = self._peek()
        if value is None or value[0] not in ("name", "text"):
            raise self.fail(f"expected a value after {name} {op}")
        self.at += 1
        return self._comparison(name, op, value[1], read)

    def _field(self, name: str) -> Callable[[Record], Value]:
        if name in ("duplicate", "representative"):
            self.named_roles = True
            roles = self.roles
            if roles is None:  # the record's own mark, written back by dedup; unmarked: neither
                if name == "duplicate":
                    return lambda r: r.dedup is not None and r.dedup.duplicate
                return lambda r: r.dedup is not None and r.dedup.representative and r.dedup.group is not None
            return (
                (lambda r: r.uri in roles.duplicates)
                if name == "duplicate"
                else (lambda r: r.uri in roles.representatives)
            )
        prefix, dot, rest = name.partition(".")
        if dot and prefix in _PREFIXED and rest:
            return _scored(prefix, rest)
        if name in _FIELDS:
            return _FIELDS[name]
        known = ", ".join([*_FIELDS, "duplicate", "representative", *(f"{p}.NAME" for p in _PREFIXED)])
        raise self.fail(f"unknown field {name!r}; choose from {known}")

    def _flag(self, name: str, read: Callable[[Record], Value]) -> Test:
        if name in ("flagged", "duplicate", "representative", *_BOOLEAN_STATISTICS):
            return lambda r: read(r) is True
        if name == "error":
            return lambda r: r.error is not None
        raise self.fail(
            f"{name} needs a comparison (e.g. {name} = …); flags alone: flagged, error, duplicate,"
            " representative, quality.low_information"
        )

    def _comparison(self, name: str, op: str, raw: str, read: Callable[[Record], Value]) -> Test:
        wanted = self._value(name, op, raw)
        if op == "~":
            if not isinstance(wanted, str):
                raise self.fail(f"~ (contains) takes text: {name} ~ …")
            needle = wanted.lower()
            return lambda r: isinstance(got := read(r), str) and needle in got.lower()
        if name == "tag":  # the record carries this tag
            if op not in ("=", "==", "!="):
                raise self.fail("tag takes = or != (a tag the record carries); its score is tags.NAME")
            has: Test = lambda r: r.tags is not None and any(label.tag == wanted for label in r.tags.labels)  # noqa: E731
            return has if op != "!=" else (lambda r: not has(r))
        compare = _ORDER[op]
        if isinstance(wanted, (bool, str)) and op not in ("=", "==", "!="):
            raise self.fail(f"{name} takes = or !=, not {op}")

        def test(record: Record) -> bool:
            got = read(record)
            if got is None:
                return op == "!="
            return compare(got, wanted)

        return test

    def _value(self, name: str, op: str, raw: str) -> Value:
        word = raw.lower()
        if name in ("flagged", "duplicate", "representative", *_BOOLEAN_STATISTICS):
            if word not in _TRUE | _FALSE:
                raise self.fail(f"{name} {op} {raw}: expected true or false")
            return word in _TRUE
        if name == "error":
            if word != "none" and word not in _KINDS:
                raise self.fail(f"error {op} {raw}: expected none or one of {', '.join(sorted(_KINDS))}")
            return word
        if name == "format":
            return raw.upper()
        if name in ("tag", "job", "caption") or op == "~":
            return raw
        if name == "processed_at":
            try:
                moment = datetime.fromisoformat(raw)
            except ValueError:
                raise self.fail(f"processed_at {op} {raw}: expected a date (2026-01-31) or ISO time") from None
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        try:
            return float(raw)
        except ValueError:
            raise self.fail(f"{name} {op} {raw}: expected a number") from None


_LEGACY = re.compile(r"\s*(flagged|error|tag|format|job)\s*(!?=)\s*([^\s()<>=!~\"'][^()<>=!~\"']*?)\s*", re.I)


def _legacy(text: str) -> str:
    """The first form, `field=value` with a value of several words (`tag=hot dog`): quoted, so it
    means what it meant; a value holding `and`, `or` or `not` is read as an expression."""
    found = _LEGACY.fullmatch(text)
    if found is None or _WORDS & set(found.group(3).lower().split()):
        return text
    return f"{found.group(1)} {found.group(2)} {json.dumps(found.group(3))}"


def _tokens(text: str, fail: Callable[[str], UserError]) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        found = _TOKEN.match(text, at)
        if found is None or found.end() == at:
            raise fail(f"cannot read {text[at:].strip()[:20]!r} (an unclosed quote?)")
        opened, closed, op, double, single, name = found.groups()
        if opened:
            tokens.append(("(", "("))
        elif closed:
            tokens.append((")", ")"))
        elif op:
            tokens.append(("op", op))
        elif double is not None or single is not None:
            tokens.append(("text", double if double is not None else single))
        else:
            tokens.append(("name", name))
        at = found.end()
    return tokens


def _error_kind(record: Record) -> Value:
    return record.error.kind.value if record.error else "none"


_FIELDS: dict[str, Callable[[Record], Value]] = {
    "flagged": lambda r: r.moderation.flagged if r.moderation else None,
    "error": _error_kind,
    "tag": lambda r: None,  # compared by `_comparison` itself
    "format": lambda r: (r.image.format or "").upper() if r.image else None,
    "job": lambda r: r.job_id,
    "caption": lambda r: r.caption.text if r.caption else None,
    "width": lambda r: r.image.width if r.image else None,
    "height": lambda r: r.image.height if r.image else None,
    "bytes": lambda r: r.bytes,
    "processed_at": lambda r: r.processed_at,
}


def _scored(prefix: str, name: str) -> Callable[[Record], Value]:
    """`tags.NAME`, `moderation.LABEL`, `score.NAME`, `quality.NAME`: one number of the record."""
    if prefix == "tags":
        # a tag below the threshold or out of the top-k is absent from the record: its score counts as 0
        return lambda r: None if r.tags is None else next((t.score for t in r.tags.labels if t.tag == name), 0.0)
    if prefix == "moderation":
        return lambda r: None if r.moderation is None else r.moderation.scores.get(name)
    if prefix == "quality" and f"quality.{name}" in _BOOLEAN_STATISTICS:
        return lambda r: None if r.quality is None else getattr(r.quality, name)
    # fields a record may or may not have, by name (probes' scores, image statistics)
    return lambda r: _number(getattr(r, "scores" if prefix == "score" else "quality", None), name)


def _number(mapping: object, name: str) -> Value:
    if mapping is None:
        return None
    value = mapping.get(name) if isinstance(mapping, dict) else getattr(mapping, name, None)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: bool(a == b),
    "==": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}
