"""Keeping secrets out of output: URLs are shown with their password replaced by `***`."""

import re

_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@]*):(?P<password>[^@/]*)@")


def redact_url(url: str) -> str:
    """`redis://:secret@host/0` -> `redis://:***@host/0`; URLs without a password are unchanged."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
