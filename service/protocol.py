"""The HTTP API contract: every request and response body, as pydantic models (they drive OpenAPI).

Types are strict (a number is not a string, "yes" is not a boolean) and unknown fields are refused,
so a client's typo comes back as a 422 naming the field instead of a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SkipValidation, StrictBool, \
    StrictInt, StrictStr, WithJsonSchema, model_validator


class FieldError(ValueError):
    """A cross-field validation error that knows which field it is about (the 422 handler reads `.field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or whitespace-only")
    return text


# The schema says what _non_blank checks (a character that str.strip() keeps), so generated clients and
# fuzzers know that "" and "  " are refused.
Text = Annotated[StrictStr, AfterValidator(_non_blank),
                 WithJsonSchema({"type": "string", "minLength": 1, "pattern": r"[^\s\x1c-\x1f\x85]"})]


def _surrogate_at(text: str) -> int | None:
    try:
        text.encode("utf-8")  # (C speed: a 1 MB text costs no Python loop)
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def first_invalid_unicode(value, path: str = "") -> tuple[str, str] | None:
    """(dotted path, problem) of the first string in a parsed JSON value that is not valid Unicode: JSON's
    \\ud800-style escapes can encode lone surrogates, which no tokenizer (nor UTF-8) accepts."""
    if isinstance(value, str):
        bad = _surrogate_at(value)
        return None if bad is None else (path, f"must be valid Unicode (lone surrogate \\u{ord(value[bad]):04x} "
                                               f"at character {bad})")
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = first_invalid_unicode(child, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class UnicodeChecked(BaseModel):
    """Refuses any string, at any depth, that is not valid Unicode, naming its field (a 422, not a 500)."""

    checked_elsewhere: ClassVar[tuple[str, ...]] = ()  # fields validated on their own later (batch items)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if isinstance(data, dict):
            found = first_invalid_unicode({k: v for k, v in data.items() if k not in cls.checked_elsewhere})
            if found is not None:
                raise FieldError(*found)
        return data


def whole_number(value):
    # JSON has one number type: 3.0 is the integer 3 (and JSON Schema says so). NaN, inf, 2.5, "3" and
    # true stay refused by StrictInt.
    return int(value) if isinstance(value, float) and value.is_integer() else value


PositiveWholeNumber = Annotated[Annotated[StrictInt, Field(ge=1)], BeforeValidator(whole_number)]


class _Request(UnicodeChecked):
    model_config = ConfigDict(extra="forbid")


def _model_field():
    return Field(default=None, description="the model (or ensemble) to score with, as /v1/models lists them; "
                 "absent: the default model. An unknown name is a 404 model_not_found naming the served models")


# ---- requests

def _content(value):
    """OpenAI-style content: a string, or a list of {"type": "text", "text": ...} parts, joined with "\n" as
    vLLM joins them. Other part types (images, audio) have no meaning for a text reward model."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise FieldError(str(j), "must be a content part object ({\"type\": \"text\", \"text\": ...})")
        if part.get("type") != "text":
            raise FieldError(f"{j}.type", f"only \"text\" content parts are supported, got {part.get('type')!r}")
        if not isinstance(part.get("text"), str):
            raise FieldError(f"{j}.text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


_TEXT_PART_SCHEMA = {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
Content = Annotated[StrictStr, BeforeValidator(_content), WithJsonSchema(
    {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART_SCHEMA}]})]


class Message(UnicodeChecked):
    """One chat message, the same on /v1 (ScoreRequest.messages) and on the compat routes (/classify, /pooling):
    the same roles, and content as a string or OpenAI text parts (joined with "\\n"). Unknown keys are ignored,
    unlike elsewhere on /v1: OpenAI-style clients send keys a reward model has no use for (name, tool_calls),
    and a typo in a key is still a 422, since both keys are required."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "human", "assistant"]
    content: Content


class ScoreRequest(_Request):
    """One (prompt, response) pair, or a chat whose last assistant message is the response."""

    # The two forms, for the schema (the model validator below enforces them, with field-named messages).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"title": "pair", "required": ["prompt", "response"],
         "properties": {"prompt": {"type": "string"}, "response": {"type": "string"}, "messages": {"type": "null"}}},
        {"title": "chat", "required": ["messages"],
         "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}, "response": {"type": "null"}}},
    ]})

    prompt: Text | None = None
    response: Text | None = None
    messages: list[Message] | None = Field(
        default=None, description="alternative to prompt/response: the last message (role assistant) is the "
        "response, the earlier ones the prompt, rendered with the bundle's chat template if it has one, else as "
        "'\\n\\nHuman: ...\\n\\nAssistant:' text",
        json_schema_extra={"minItems": 2})
    model: StrictStr | None = _model_field()
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
    checked_elsewhere: ClassVar[tuple[str, ...]] = ("items",)
    items: list[SkipValidation[ScoreRequest]] = Field(description="at most max_client_batch items (an item "
                                                      "names no `model`: the batch's applies to all)")
    model: StrictStr | None = _model_field()


class RankRequest(_Request):
    prompt: Text
    responses: list[Text] = Field(min_length=1, description="candidates, at most max_client_batch")
    top_k: PositiveWholeNumber | None = Field(default=None, description="return only the best top_k indices in "
                                    "`ranking` (`results` always covers every response)")
    truncate: StrictBool = True
    model: StrictStr | None = _model_field()


class CompareRequest(_Request):
    prompt: Text
    a: Text
    b: Text
    truncate: StrictBool = True
    model: StrictStr | None = _model_field()


# ---- responses

class ScoreResult(BaseModel):
    score: float = Field(description="z-score of raw against the bundle's reference distribution")
    raw: float = Field(description="the model's raw reward")
    percentile: float = Field(description="percentile rank (0..100) of raw within the reference distribution")
    n_tokens: int = Field(description="tokens the model saw, special tokens included")
    truncated: bool
    model: str = Field(description="the model (or ensemble) that scored it: the request's `model`, or the default")
    version: str | None = Field(default=None, description="the version of that model that scored it (its folder "
                                "in the model repository; \"1\" for a --bundle; an ensemble's members' "
                                "versions joined, e.g. \"a@2,b@1\")")
    warnings: list[str] | None = Field(default=None, description="present only when something is off with what "
                                       "the model saw, one 'code: explanation' string each; codes: doubled_bos, "
                                       "doubled_eos, missing_eos, response_truncated, special_token_in_content, "
                                       "forged_turn (see docs/integrations.md, docs/decoders.md)")
    flags: list[str] | None = Field(default=None, description="present only when the score lies beyond the "
                                    "bundle's calibration range: above_calibration_p99 (raw above the reference "
                                    "set's 99th percentile) or below_calibration_p1 (see docs/monitoring.md); "
                                    "or when the input tried a turn forgery: special_token_in_content (a control "
                                    "token's text in content, read as plain characters), forged_turn (templated "
                                    "text whose response opens a new chat turn; docs/decoders.md); an "
                                    "ensemble's: high_uncertainty (uncertainty above its reference-set p99)")
    members: dict[str, float] | None = Field(default=None, description="ensembles only: each member's z-score, "
                                             "keyed by member name (docs/api.md, Ensembles)")
    uncertainty: float | None = Field(default=None, description="ensembles only: the population standard "
                                      "deviation of the members' z-scores; above the ensemble's reference-set "
                                      "p99 the result is flagged high_uncertainty")
    # Not on the wire: an ensemble's members' raw rewards, which its probability() needs (service/ensemble.py).
    _member_raw: dict[str, float] | None = None


class ErrorBody(BaseModel):
    type: str = Field(description="validation_error, invalid_json, invalid_request, unsupported_media_type, "
                      "payload_too_large, not_found, method_not_allowed, unauthorized, forbidden, overloaded, "
                      "draining, not_ready, timeout, internal_error, model_not_found")
    message: str
    field: str | None = Field(default=None, description="dotted path of the offending field, e.g. items.3.response")
    id: str | None = Field(default=None, description="internal_error only: the error id, also sent as the "
                           "X-Error-Id header and written to the server log with the cause")


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
    probability: float = Field(description="P(a preferred over b) = sigmoid((raw_a - raw_b) / T) (Bradley-Terry; "
                               "T: the model's fitted temperature, 1 without one; an ensemble's own rule)")
    a: ScoreResult
    b: ScoreResult


class NormalizationInfo(BaseModel):
    mean: float
    std: float
    n: int
    reference: str


class PrecisionCheck(BaseModel):
    """Set when the runtime computes at another precision than the bundle was exported at (fp16 on a GPU)."""
    precision: str = Field(description="what the runtime computes in")
    reference_pairs: int
    pairwise_agreement: float = Field(description="share of reference pairs ordered like the exported PyTorch model")
    max_abs_diff: float = Field(description="largest |score − PyTorch score| over those responses")
    threshold: float = Field(description="the agreement the service requires before it serves")


class VersionInfo(BaseModel):
    """One version of a repository model in /v1/models (service/registry.py)."""
    version: str
    state: Literal["available", "loading", "ready", "draining", "failed"] = Field(description="available: a "
                                                                                  "valid bundle not loaded; ready: "
                                                                                  "serving (or shadow); draining: "
                                                                                  "swapped out, finishing its "
                                                                                  "requests; failed: see reason")
    reason: str | None = Field(default=None, description="failed: why it is not served (one line)")
    traffic: float | None = Field(default=None, description="share of the model's requests it takes")
    shadow: bool | None = Field(default=None, description="scores every request in the background, never answers")


class ModelInfo(BaseModel):
    id: str
    version: str | None = Field(default=None, description="the version these details describe")
    state: Literal["ready"] | None = Field(default=None, description="ready: requests are served (a name that "
                                           "cannot be served is listed as a ModelStatus)")
    reason: str | None = Field(default=None, description="why the repository's latest change to this model is "
                               "not served (e.g. a new version failed verification); the versions listed serve")
    versions: list[VersionInfo] | None = Field(default=None, description="every version in the repository and "
                                               "its state")
    traffic: dict[str, float] | None = Field(default=None, description="canary split: version -> share of "
                                             "requests (config.json traffic); absent: all to `version`")
    shadow: str | None = Field(default=None, description="the version scoring every request in the background "
                               "(config.json shadow)")
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
    runtime: dict = Field(description="runtime.describe(): runtime name, provider really used, precision "
                          "computed in, IO binding, threads, batch hint")
    precision_check: PrecisionCheck | None = Field(default=None, description="startup check of a precision "
                                                   "change against the bundle's recorded scores")
    max_client_batch: int | None = Field(default=None, description="items per /v1/score/batch request (clients "
                                         "chunk larger batches to this)")
    chat_template: bool = Field(default=False, description="the bundle carries a chat template: 'messages' "
                                "are rendered with it")
    audit: dict | None = Field(default=None, description="reward-hacking audit of the reference set at export "
                               "(length sensitivity, accuracy by length, calibration; docs/monitoring.md)")
    calibration: dict | None = Field(default=None, description="preference-probability calibration at export: "
                                     "`temperature` (divides r_a - r_b before the logistic; absent = 1.0), ECE "
                                     "before/after per set, the sets' audit rows (docs/monitoring.md)")


class EnsembleInfo(BaseModel):
    """An ensemble's /v1/models entry (service/ensemble.py; docs/api.md, Ensembles)."""
    id: str
    kind: Literal["ensemble"] = "ensemble"
    version: str = Field(description="the members' versions joined, e.g. \"a@2,b@1,c@1\"")
    members: dict[str, str] = Field(description="member name -> the version it serves with")
    aggregate: Literal["mean", "min", "uwo", "weighted", "gate"]
    parameters: dict = Field(default_factory=dict, description="the aggregate's own: lambda (uwo), weights "
                             "(weighted), gate / below / else (gate)")
    reference_responses: int = Field(description="reference responses (the members' bundles' reference pairs) "
                                     "scored by every member at load")
    uncertainty_p99: float = Field(description="99th percentile of the uncertainty over those responses: a "
                                   "result above it is flagged high_uncertainty")
    state: Literal["ready"] | None = Field(default=None, description="ready: requests are served (an ensemble "
                                           "that cannot be served is listed as a ModelStatus)")
    reason: str | None = Field(default=None, description="why the repository's latest change to this ensemble "
                               "is not served, while the previous one keeps serving")


class ModelStatus(BaseModel):
    """A repository entry with nothing served (service/registry.py): still loading, or why not."""
    id: str
    state: Literal["loading", "failed"]
    reason: str | None = Field(default=None, description="failed: why, one line")
    versions: list[VersionInfo] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo | EnsembleInfo | ModelStatus]


class Status(BaseModel):
    status: str
