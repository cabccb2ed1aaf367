"""Sink URL options: the one parser of the `?name=value&…` query on a sink URL, for every sink.

Values are percent-decoded but `+` stays `+` (libpq and S3 tag keys take it literally); each option once.
"""

from collections.abc import Collection, Mapping
from urllib.parse import unquote

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url


def split_options(
    url: str, known: Collection[str] | Mapping[str, str], *, pass_unknown: bool = False
) -> tuple[str, dict[str, str]]:
    """`s3://b/out/?format=parquet` -> (`s3://b/out/`, {"format": "parquet"}); options absent are absent.

    `known` names the options this sink reads (a mapping also gives each one's values, for the message).
    Any other option is a UserError, or with `pass_unknown` stays in the returned URL byte for byte
    (a PostgreSQL URL's own parameters, which libpq reads). An option given twice is a UserError."""
    base, sep, query = url.partition("?")
    given: dict[str, list[str]] = {}
    rest: list[str] = []
    for part in query.split("&") if sep else []:
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        name = unquote(raw_name)
        if name in known:
            # unquote, not unquote_plus: `+` is a literal character in table names, tag prefixes and passwords
            given.setdefault(name, []).append(unquote(raw_value))
        else:
            rest.append(part)
    if rest and not pass_unknown:
        unknown = sorted(dict.fromkeys(unquote(part.partition("=")[0]) for part in rest))
        raise UserError(f"sink {redact_url(url)}: unknown option {', '.join(unknown)}; only {_usage(known)}")
    for name, values in given.items():
        if len(values) > 1:
            raise UserError(f"sink {redact_url(url)}: give ?{name}= once")
    return (f"{base}?{'&'.join(rest)}" if rest else base), {name: values[0] for name, values in given.items()}


def _usage(known: Collection[str] | Mapping[str, str]) -> str:
    hints = known if isinstance(known, Mapping) else dict.fromkeys(known, "")
    return " or ".join(f"?{name}={hints[name]}" for name in sorted(hints)) or "no options"
