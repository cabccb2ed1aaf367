"""Sink URLs without their secrets where they are shared (Redis), and with them again in a process
that holds its own: the job registry and schedules store `postgresql://user@host/db`, never a password.

A worker or producer opening a stored sink takes the password from its own environment: the sink URL
in its own `IMAGEMILL_SINK` when that names the same server, database and user; otherwise none, and
libpq finds one itself (`PGPASSWORD`, `PGPASSFILE`/`~/.pgpass`, a service file).
"""

import re
from urllib.parse import urlsplit

_SECRET_PARAM = re.compile(r"(?i)(?:^|&)(?:password|sslpassword)=[^&]*")
_SCHEME_ALIASES = {"postgres": "postgresql"}


def without_credentials(url: str) -> str:
    """`postgresql://user:pass@host/db?password=x&table=t` -> `postgresql://user@host/db?table=t`."""
    user, password, rest = _userinfo(url)
    if password is None and not _SECRET_PARAM.search(rest.partition("?")[2]):
        return url
    scheme = url.partition("://")[0]
    base, _, query = rest.partition("?")
    query = _SECRET_PARAM.sub("", query).lstrip("&")
    return f"{scheme}://{user + '@' if user else ''}{base}{'?' + query if query else ''}"


def with_own_credentials(stored: str, own: str | None) -> str:
    """The URL to open for a `stored` sink: `stored` with the password of `own` (this process's
    IMAGEMILL_SINK) when `own` names the same scheme, server, port, database and user; else `stored`."""
    if own is None or _identity(own) is None or _identity(own) != _identity(stored):
        return stored
    user, _, rest = _userinfo(without_credentials(stored))
    secrets = "&".join(m.group(0).lstrip("&") for m in _SECRET_PARAM.finditer(_userinfo(own)[2].partition("?")[2]))
    _, own_password, _ = _userinfo(own)
    scheme = stored.partition("://")[0]
    userinfo = f"{user}:{own_password}@" if own_password is not None else (f"{user}@" if user else "")
    joiner = "&" if "?" in rest else "?"
    return f"{scheme}://{userinfo}{rest}{joiner + secrets if secrets else ''}"


def _userinfo(url: str) -> tuple[str, str | None, str]:
    """(user, password or None, what follows the `@`) of `scheme://user:password@rest`.

    Greedy to the LAST `@`, as the redaction is: generated passwords often hold unencoded `/`, `?` or `@`."""
    _, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return "", None, rest
    user, colon, password = rest[:at].partition(":")
    return user, password if colon else None, rest[at + 1 :]


def _identity(url: str) -> tuple[str, ...] | None:
    """What must match for one URL's credentials to belong to another: scheme, host, port, path, user."""
    if "://" not in url:
        return None
    try:
        parts = urlsplit(without_credentials(url))
        port = str(parts.port or "")
    except ValueError:
        return None
    scheme = _SCHEME_ALIASES.get(parts.scheme, parts.scheme)
    return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/"), parts.username or ""
