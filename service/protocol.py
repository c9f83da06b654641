"""The HTTP API contract: every request and response body, as pydantic models (they drive OpenAPI).

Types are strict (a number is not a string, "yes" is not a boolean) and unknown fields are refused,
so a client's typo comes back as a 422 naming the field instead of a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SkipValidation, StrictBool, StrictInt, \
    StrictStr, model_validator


class FieldError(ValueError):
    """A cross-field validation error that knows which field it is about (the 422 handler reads `.field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace-only")
    return text


Text = Annotated[StrictStr, AfterValidator(_non_blank)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests

class Message(_Request):
    role: Literal["system", "user", "human", "assistant"]
    content: StrictStr


class ScoreRequest(_Request):
    """One (prompt, response) pair, or a chat whose last assistant message is the response."""

    prompt: Text | None = None
    response: Text | None = None
    messages: list[Message] | None = Field(
        default=None, description="alternative to prompt/response: the last message (role assistant) is the "
        "response, the earlier ones the prompt, rendered as '\\n\\nHuman: ...\\n\\nAssistant:' text")
    truncate: StrictBool = Field(default=True, description="true: over-long input is cut (prompt first, the "
                                 "response end is kept) and flagged; false: over-long input is a 422")

    @model_validator(mode="after")
    def _one_form(self) -> "ScoreRequest":
        if self.messages is not None:
            for name in ("prompt", "response"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "give either 'prompt' and 'response', or 'messages', not both")
            if len(self.messages) < 2:
                raise FieldError("messages", "needs at least one prompt message and a final assistant message")
            last = self.messages[-1]
            if last.role != "assistant":
                raise FieldError(f"messages.{len(self.messages) - 1}.role", "the last message must be the "
                                 "assistant's response")
            if not last.content.strip():
                raise FieldError(f"messages.{len(self.messages) - 1}.content",
                                 "must not be empty or whitespace-only")
            return self
        for name in ("prompt", "response"):
            if getattr(self, name) is None:
                raise FieldError(name, "field required (or give 'messages')")
        return self


class BatchScoreRequest(_Request):
    # Items are validated one by one by the endpoint so that one bad item fails only itself;
    # SkipValidation keeps ScoreRequest in the OpenAPI schema.
    items: list[SkipValidation[ScoreRequest]] = Field(description="at most max_client_batch items")


class RankRequest(_Request):
    prompt: Text
    responses: list[Text] = Field(min_length=1, description="candidates, at most max_client_batch")
    top_k: StrictInt | None = Field(default=None, ge=1, description="return only the best top_k indices in "
                                    "`ranking` (`results` always covers every response)")
    truncate: StrictBool = True


class CompareRequest(_Request):
    prompt: Text
    a: Text
    b: Text
    truncate: StrictBool = True


# ---- responses

class ScoreResult(BaseModel):
    score: float = Field(description="z-score of raw against the bundle's reference distribution")
    raw: float = Field(description="the model's raw reward")
    percentile: float = Field(description="percentile rank (0..100) of raw within the reference distribution")
    n_tokens: int = Field(description="tokens the model saw, special tokens included")
    truncated: bool
    model: str


class ErrorBody(BaseModel):
    type: str = Field(description="validation_error, invalid_json, payload_too_large, not_found, "
                      "method_not_allowed, overloaded, draining, not_ready, timeout, internal_error")
    message: str
    field: str | None = Field(default=None, description="dotted path of the offending field, e.g. items.3.response")


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint and of per-item batch failures."""

    error: ErrorBody


class BatchScoreResponse(BaseModel):
    results: list[ScoreResult | ErrorResponse] = Field(description="one per item, in request order")


class RankResponse(BaseModel):
    results: list[ScoreResult] = Field(description="one per response, in request order")
    ranking: list[int] = Field(description="response indices, best first (top_k of them if given)")
    best_index: int


class CompareResponse(BaseModel):
    probability: float = Field(description="P(a preferred over b) = sigmoid(raw_a - raw_b) (Bradley-Terry)")
    a: ScoreResult
    b: ScoreResult


class NormalizationInfo(BaseModel):
    mean: float
    std: float
    n: int
    reference: str


class ModelInfo(BaseModel):
    id: str
    base_model: str
    created_at: str
    model_format: str
    precision: str
    pooling: str
    max_length: int
    join: str
    normalization: NormalizationInfo
    eval: dict[str, dict]
    parity_passed: bool
    runtime: dict = Field(description="runtime.describe(): runtime name, provider really used, threads")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Status(BaseModel):
    status: str
