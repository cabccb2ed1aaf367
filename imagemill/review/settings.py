"""The review app's settings (prefix `IMAGEMILL_REVIEW_`) and its reviewers' tokens.

Separate from `imagemill.core.settings`: only the review app reads them. The object storage the
thumbnails come from is the core settings' (`IMAGEMILL_S3_ENDPOINT_URL`, `IMAGEMILL_MAX_IMAGE_*`).
"""

import hashlib
import json
import re
from pathlib import Path

import pydantic_settings
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagemill.core.errors import UserError

ENV_PREFIX = "IMAGEMILL_REVIEW_"
REVIEWER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# below this a token is guessable by a patient script; the app starts, but says so
SHORT_TOKEN = 16


class ReviewSettings(BaseSettings):
    """Each field `foo` is read from `IMAGEMILL_REVIEW_FOO`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    tokens: str | None = Field(
        default=None,
        description='reviewer -> token as a JSON object ({"alice": "…"}), or the path of a file holding one',
    )
    audit_rate: float = Field(
        default=0.01, ge=0.0, le=1.0, description="share of unflagged records sampled into the queue"
    )
    lease_s: int = Field(default=300, ge=5, le=86_400, description="how long a claimed item stays the claimer's")
    page_size: int = Field(default=24, ge=1, le=200, description="items the page claims at a time")
    blur: bool = Field(default=True, description="blur flagged thumbnails until the reviewer reveals them")
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30, description="how long a login lasts")
    session_secret: str | None = Field(
        default=None,
        description="signs session cookies; default: derived from the tokens (changing a token logs everyone out)",
    )
    metrics_token: str | None = Field(
        default=None, description="a Bearer token that may read /metrics only (reviewers' tokens may too)"
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="proxies whose X-Forwarded-Proto/-For are believed (comma-separated, as uvicorn takes them)",
    )
    write_tags: bool = Field(default=False, description="also tag each decided S3 object imagemill-review=…")
    thumbnail_cache: int = Field(default=512, ge=0, le=100_000, description="thumbnails kept in memory")
    max_body_bytes: int = Field(default=16_384, ge=256, le=1_048_576, description="largest request body accepted")


def get_review_settings() -> ReviewSettings:
    """The settings from the environment; a bad value is one UserError line per variable."""
    try:
        return ReviewSettings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ENV_PREFIX + str(error["loc"][0]).upper()
            lines.append(f"{name}: {error['msg']}")
        raise UserError("\n".join(lines)) from None
    except pydantic_settings.SettingsError as exc:
        raise UserError(str(exc)) from None


def load_tokens(value: str | None) -> dict[str, str]:
    """`IMAGEMILL_REVIEW_TOKENS` (JSON, or a path to a JSON file) -> reviewer -> token.

    UserError, in one line that never quotes a token, when it is absent or unusable."""
    if value is None or not value.strip():
        raise UserError(
            f"no reviewers: set {ENV_PREFIX}TOKENS to a JSON object of reviewer -> token,"
            " or the path of a file holding one"
        )
    text = value.strip()
    where = f"{ENV_PREFIX}TOKENS"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        where = f"{ENV_PREFIX}TOKENS file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        parsed = json.loads(text)
    except ValueError:
        # the message of the JSON parser may quote the text, tokens included
        raise UserError(f"{where}: not valid JSON (expected an object of reviewer -> token)") from None
    if not isinstance(parsed, dict) or not parsed:
        raise UserError(f"{where}: expected a non-empty JSON object of reviewer -> token")
    tokens: dict[str, str] = {}
    for name, token in parsed.items():
        if not REVIEWER_NAME.fullmatch(name):
            raise UserError(f"{where}: reviewer name {name[:64]!r} must be letters, digits and _ . @ - (at most 64)")
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise UserError(f"{where}: the token of {name} must be a non-empty string without surrounding spaces")
        tokens[name] = token
    if len(set(tokens.values())) != len(tokens):
        raise UserError(f"{where}: two reviewers share a token; each needs their own")
    return tokens


def session_secret(settings: ReviewSettings, tokens: dict[str, str]) -> bytes:
    """The key session cookies are signed with: the configured one, else one derived from the tokens
    (the same in every replica, and a changed token invalidates every session)."""
    if settings.session_secret:
        return settings.session_secret.encode()
    canonical = json.dumps(tokens, sort_keys=True).encode()
    return hashlib.sha256(b"imagemill-review-session\x00" + canonical).digest()
