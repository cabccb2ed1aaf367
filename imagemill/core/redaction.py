"""Keeping secrets out of output: URLs are shown with their password replaced by `***`.

Driver messages that may quote a URL are scrubbed of every piece of its password too.
"""

import re

_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#]*")


def redact_url(url: str) -> str:
    """`scheme://user:pass@host/db` -> `scheme://user:***@host/db`, and `?password=` values -> `***`."""
    return _PASSWORD_PARAM.sub(r"\1***", _redact_userinfo(url))


def _redact_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    password = _url_password(url)
    if not sep or password is None:
        return url
    user = rest.partition(":")[0]
    return f"{scheme}://{user}:***{rest[len(user) + 1 + len(password) :]}"


def _url_password(url: str) -> str | None:
    """The password as written in the URL, or None.

    Deliberately greedy (from the first `:` of the user part to the LAST `@`): generated passwords
    often hold unencoded `/` or `?`, and hiding too much beats printing half a secret."""
    _, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0 or ":" not in rest[:at]:
        return None
    return rest[:at].partition(":")[2]


def scrub_secret(message: str, url: str) -> str:
    """One line of a driver message, without any piece of the URL's password in it."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    password = _url_password(url)
    if password:
        # libpq may have split a malformed password into host/port/dbname and quote a piece of it
        pieces = [password, *(p for p in re.split(r"[/?#@:]", password) if len(p) >= 4)]
        for piece in sorted(pieces, key=len, reverse=True):
            text = text.replace(piece, "***")
    return text
