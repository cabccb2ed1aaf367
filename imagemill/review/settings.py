"""The review app's settings (prefix `IMAGEMILL_REVIEW_`), its reviewers (tokens and roles) and its bands.

Separate from `imagemill.core.settings`: only the review app reads them. The object storage the
thumbnails come from is the core settings' (`IMAGEMILL_S3_ENDPOINT_URL`, `IMAGEMILL_MAX_IMAGE_*`),
and so are the moderation thresholds the queue shows and sorts by (`IMAGEMILL_MODERATION_THRESHOLDS`).
"""

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import pydantic_settings
from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imagemill.core.errors import UserError
from imagemill.core.settings import SettingsError, describe_errors

ENV_PREFIX = "IMAGEMILL_REVIEW_"
REVIEWER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# below this a token is guessable by a patient script: the app refuses to start
MIN_TOKEN = 16
SECRET_FIELDS = frozenset({"tokens", "session_secret", "metrics_token"})
REASON_CODE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
# the reviewer name decisions made by the auto-reject bands are recorded under
AUTO = "auto"


class Role(StrEnum):
    REVIEWER = "reviewer"
    LEAD = "lead"


@dataclass(frozen=True)
class Reviewer:
    """Who is asking: a name (tokens file or proxy header) and a role."""

    name: str
    role: Role = Role.REVIEWER

    @property
    def lead(self) -> bool:
        return self.role is Role.LEAD


def _json_value(value: object) -> object:
    # NoDecode fields: the JSON is parsed here so that a bad value is one line in our words
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except ValueError:
        raise PydanticCustomError("json_invalid", "expected JSON") from None


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
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30, description="how long a login lasts at most")
    session_secret: str | None = Field(
        default=None,
        description="signs the login form's nonce and proxy mode's CSRF tokens; default: a random key kept in"
        " the database (the same for every replica)",
    )
    metrics_token: str | None = Field(
        default=None, description="a Bearer token that may read /metrics only (reviewers' tokens may too)"
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="proxies whose X-Forwarded-Proto/-For are believed (addresses or CIDRs, comma-separated)",
    )
    write_tags: bool = Field(default=False, description="also tag each decided S3 object imagemill-review=…")
    thumbnail_cache: int = Field(default=512, ge=0, le=100_000, description="thumbnails kept in memory")
    max_body_bytes: int = Field(default=16_384, ge=256, le=1_048_576, description="largest request body accepted")
    # leases, bands and second looks
    page_idle_s: int = Field(
        default=300, ge=2, le=86_400, description="the page stops renewing its claims after this long without input"
    )
    auto_reject: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description='label -> score at or above which an item is rejected without a person ({"nsfw": 0.98})',
    )
    auto_audit_rate: float = Field(
        default=0.05, ge=0.0, le=1.0, description="share of auto-rejected items a person still looks at"
    )
    second_look_rate: float = Field(
        default=0.02, ge=0.0, le=1.0, description="share of people's decisions a second reviewer looks at again"
    )
    reveal_before_deciding: bool = Field(
        default=True, description="a blurred image must be revealed before it is approved or rejected"
    )
    reasons: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description='reason codes a reviewer may give, as a JSON list (["nudity", "violence"])'
    )
    counts_refresh_s: float = Field(
        default=300.0,
        ge=0.2,
        le=86_400,
        description="how often the queue's counts are recounted in full (new records join `left` then; decisions"
        " count at once)",
    )
    # sessions and sign-in
    session_idle_minutes: float = Field(default=30.0, gt=0, le=24 * 60, description="a session unused this long ends")
    login_failures_per_address: int = Field(
        default=20, ge=1, le=100_000, description="failed logins from one address within the window before 429"
    )
    login_failures_per_reviewer: int = Field(
        default=10, ge=1, le=100_000, description="failed logins as one reviewer within the window before 429"
    )
    login_window_s: int = Field(default=600, ge=1, le=86_400, description="the window failed logins are counted in")
    auth: Literal["tokens", "proxy"] = Field(
        default="tokens", description="tokens: reviewers log in with their token; proxy: an auth proxy names them"
    )
    proxy_header: str = Field(
        default="X-Forwarded-User", min_length=1, description="proxy mode: the header holding the reviewer's name"
    )
    proxy_addresses: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="proxy mode: the proxies' addresses or CIDRs (comma-separated) whose header is believed"
    )
    proxy_role_header: str | None = Field(
        default=None, description="proxy mode: a header of comma-separated groups (X-Forwarded-Groups)"
    )
    proxy_lead_groups: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("lead",), description="proxy mode: groups in the role header that make a reviewer a lead"
    )
    proxy_logout_url: str | None = Field(
        default=None, description="proxy mode: where Log out sends the browser after releasing its claims"
    )

    @field_validator("auto_reject", mode="before")
    @classmethod
    def _auto_reject_json(cls, value: object) -> object:
        parsed = _json_value(value)
        return {} if parsed is None else parsed

    @field_validator("auto_reject")
    @classmethod
    def _scores(cls, value: dict[str, float]) -> dict[str, float]:
        for label, score in value.items():
            if not 0.0 <= score <= 1.0:
                raise PydanticCustomError("score", "{label}: expected a score from 0 to 1", {"label": label})
        return value

    @field_validator("reasons", mode="before")
    @classmethod
    def _reasons_json(cls, value: object) -> object:
        parsed = _json_value(value)
        return () if parsed is None else parsed

    @field_validator("reasons")
    @classmethod
    def _reason_codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if not REASON_CODE.fullmatch(code):
                raise PydanticCustomError(
                    "reason", "{code!r}: expected lowercase letters, digits, _ and - (at most 40)", {"code": code[:40]}
                )
        if len(set(value)) != len(value):
            raise PydanticCustomError("reason", "a reason code is listed twice")
        return value

    @field_validator("proxy_addresses", "proxy_lead_groups", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return tuple(part.strip() for part in value.split(",") if part.strip()) if isinstance(value, str) else value

    @field_validator("proxy_addresses")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise PydanticCustomError("network", "{text!r}: expected an address or CIDR", {"text": text}) from None
        return value


def get_review_settings() -> ReviewSettings:
    """The settings from the environment; a bad value is one UserError line per variable."""
    try:
        return ReviewSettings()
    except ValidationError as exc:
        # the core settings' wording; the tokens and secrets are never quoted
        raise SettingsError(
            describe_errors(exc.errors(), os.environ, ENV_PREFIX, ReviewSettings, SECRET_FIELDS)
        ) from None
    except pydantic_settings.SettingsError as exc:
        raise UserError(str(exc)) from None


def check_bands(review: ReviewSettings, thresholds: Mapping[str, float]) -> None:
    """The settings that only make sense together with the moderation thresholds, and proxy mode's
    own: UserError, one line, naming the variable."""
    for label, score in review.auto_reject.items():
        if label not in thresholds:
            raise UserError(
                f"{ENV_PREFIX}AUTO_REJECT: {label} has no threshold in IMAGEMILL_MODERATION_THRESHOLDS"
                f" ({', '.join(sorted(thresholds)) or 'none'})"
            )
        if score < thresholds[label]:
            raise UserError(
                f"{ENV_PREFIX}AUTO_REJECT: {label} {score} is below its threshold {thresholds[label]}:"
                " the band between them is what people review"
            )
    if not thresholds:
        raise UserError("IMAGEMILL_MODERATION_THRESHOLDS names no label: the review queue sorts by their scores")
    if review.auth == "proxy" and not review.proxy_addresses:
        raise UserError(
            f"{ENV_PREFIX}AUTH=proxy needs {ENV_PREFIX}PROXY_ADDRESSES: the proxies whose"
            f" {review.proxy_header} header is believed (any other sender could name any reviewer)"
        )


@dataclass(frozen=True)
class Tokens:
    """The tokens file: reviewer -> token, and reviewer -> role."""

    tokens: dict[str, str]
    roles: dict[str, Role]

    def reviewer(self, name: str) -> Reviewer:
        return Reviewer(name, self.roles.get(name, Role.REVIEWER))


def load_tokens(value: str | None, required: bool = True) -> Tokens:
    """`IMAGEMILL_REVIEW_TOKENS` (JSON, or a path to a JSON file) -> each reviewer's token and role:
    `{"alice": "<token>", "carol": {"token": "<token>", "role": "lead"}}`.

    UserError, in one line that never quotes a token, when it is absent (and `required`) or unusable:
    a token shorter than 16 characters, two reviewers sharing one, an unknown role."""
    if not required and (value is None or not value.strip()):
        return Tokens({}, {})
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
    roles: dict[str, Role] = {}
    for name, entry in parsed.items():
        if not REVIEWER_NAME.fullmatch(name) or name == AUTO:
            raise UserError(
                f"{where}: reviewer name {name[:64]!r} must be letters, digits and _ . @ - (at most 64), not {AUTO!r}"
            )
        token, role = (
            (entry.get("token"), entry.get("role", "reviewer")) if isinstance(entry, dict) else (entry, "reviewer")
        )
        if isinstance(entry, dict) and set(entry) - {"token", "role"}:
            raise UserError(f'{where}: {name}: expected only "token" and "role"')
        if role not in tuple(Role):
            raise UserError(f"{where}: {name}: role must be one of {', '.join(Role)}")
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise UserError(f"{where}: the token of {name} must be a non-empty string without surrounding spaces")
        tokens[name] = token
        roles[name] = Role(role)
    if len(set(tokens.values())) != len(tokens):
        raise UserError(f"{where}: two reviewers share a token; each needs their own")
    short = sorted(name for name, token in tokens.items() if len(token) < MIN_TOKEN)
    if short:
        raise UserError(
            f"{where}: the token of {', '.join(short)} is shorter than {MIN_TOKEN} characters (guessable);"
            " make each a long random string (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return Tokens(tokens, roles)
