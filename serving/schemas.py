"""Request and response types of the HTTP API (docs/architecture.md, "HTTP API")."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from keyart.contracts import DEVICES, ID_SCHEMA_PATTERN

# The whole string: pydantic's (Rust) regex and JSON Schema read `$` as the end of the text.
Id = Annotated[str, StringConstraints(pattern=ID_SCHEMA_PATTERN)]


class Context(BaseModel):
    """Where and when the page is shown. Unknown extra keys are ignored."""

    device: Literal[DEVICES] = Field(description="Device class.")  # type: ignore[valid-type]
    country: str = Field(min_length=2, max_length=8, pattern=r"^[A-Za-z]{2}[A-Za-z0-9\-]*$",
                         description="ISO 3166-1 alpha-2 country code.")
    local_hour: int = Field(ge=0, le=23, description="Member's local hour, 0-23.")
    day_of_week: int = Field(ge=0, le=6, description="0 = Monday.")


class TitleSlot(BaseModel):
    """One title on the page and where it is placed."""

    title_id: Id
    candidates: list[Id] | None = Field(
        default=None, min_length=1,
        description="Candidate artwork ids; omitted = every active artwork of the title.")
    page_row: int = Field(ge=0, le=1000, description="Row of the page, 0 = top.")
    position: int = Field(ge=0, le=1000, description="Position in the row, 0 = left.")


class ArtworkRequest(BaseModel):
    """A page to decide: one artwork per title."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "member_id": "m000042",
        "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 4},
        "titles": [{"title_id": "t0001", "candidates": ["t0001-a0", "t0001-a1"], "page_row": 0, "position": 0},
                   {"title_id": "t0002", "page_row": 0, "position": 1}],
    }]})

    member_id: Id
    context: Context
    titles: list[TitleSlot] = Field(min_length=1, description="The page; at most serve_max_titles titles.")
    ts: dt.datetime | None = Field(default=None, description=(
        "Decision time (ISO-8601, UTC). Accepted only when the server runs with "
        "serve_client_clock (simulation, log replay); otherwise the server's clock is used."))
    request_id: Id | None = Field(default=None, description=(
        "Idempotency key (or the Idempotency-Key header): a retry with the same request_id and the "
        "same body within serve_idempotency_ttl_seconds gets the same decisions and logs nothing new."))


class Decision(BaseModel):
    """The artwork chosen for one title."""

    title_id: str
    artwork_id: str
    propensity: float = Field(description="Exact probability the policy gave this artwork.")
    event_id: str = Field(description="HMAC-signed id; send it back with the reward.")
    model_version: str


class ArtworkResponse(BaseModel):
    """Decisions for every title of the page, in request order."""

    model_version: str = Field(description="Bundle version that decided, or 'default' without a model.")
    registry_version: str | None = Field(default=None, description=(
        "MLflow registry version of that bundle (models:/<name>/<version>); null for a bundle folder or "
        "without a model."))
    policy: str = Field(description="Exploration policy, or 'default' without a model.")
    fallback: bool = Field(description="True when no model is loaded and default artwork is served.")
    decisions: list[Decision]


class RewardRequest(BaseModel):
    """The outcome of one impression."""

    event_id: str = Field(min_length=1, max_length=256)
    reward: int = Field(ge=0, le=1, description="1 for a quality play.")
    minutes: float = Field(default=0.0, ge=0.0, le=1440.0, description="Minutes played.")
    ts: dt.datetime | None = Field(default=None, description=(
        "When the play happened (ISO-8601, UTC). Accepted only with serve_client_clock."))


class RewardResponse(BaseModel):
    """An accepted reward."""

    event_id: str
    artwork_id: str
    accepted: bool = True


class FieldError(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description="Where: 'body', then keys and list indices.")
    msg: str
    type: str


class Problem(BaseModel):
    """An error: ``detail`` says what was wrong; invalid requests also list ``errors``."""

    detail: Any
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None
    registry_version: str | None = Field(default=None, description="MLflow registry version of the bundle, if any.")
    source: str | None = Field(default=None, description="Where the bundle came from: a path or models:/<name>/<version>.")
    fallback: bool
    detail: str = ""
