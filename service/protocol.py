"""The HTTP API contract: every request and response body, as pydantic models (they drive OpenAPI).

Types are strict (a number is not a string, "yes" is not a boolean) and unknown fields are refused,
so a client's typo comes back as a 422 naming the field instead of a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


def _whole_number(value):
    # JSON has one number type: 3.0 is the integer 3 (and JSON Schema says so). NaN, inf, 2.5, "3" and
    # true stay refused by StrictInt.
    return int(value) if isinstance(value, float) and value.is_integer() else value


PositiveWholeNumber = Annotated[Annotated[StrictInt, Field(ge=1)], BeforeValidator(_whole_number)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests

class Message(_Request):
    role: Literal["system", "user", "human", "assistant"]
    content: StrictStr


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
    top_k: PositiveWholeNumber | None = Field(default=None, description="return only the best top_k indices in "
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
    warnings: list[str] | None = Field(default=None, description="present only when something is off with what "
                                       "the model saw, one 'code: explanation' string each; codes: doubled_bos, "
                                       "doubled_eos, missing_eos, response_truncated (see docs/integrations.md)")


class ErrorBody(BaseModel):
    type: str = Field(description="validation_error, invalid_json, invalid_request, unsupported_media_type, "
                      "payload_too_large, not_found, method_not_allowed, unauthorized, forbidden, overloaded, "
                      "draining, not_ready, timeout, internal_error")
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
    probability: float = Field(description="P(a preferred over b) = sigmoid(raw_a - raw_b) (Bradley-Terry)")
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
    runtime: dict = Field(description="runtime.describe(): runtime name, provider really used, precision "
                          "computed in, IO binding, threads, batch hint")
    precision_check: PrecisionCheck | None = Field(default=None, description="startup check of a precision "
                                                   "change against the bundle's recorded scores")
    max_client_batch: int | None = Field(default=None, description="items per /v1/score/batch request (clients "
                                         "chunk larger batches to this)")
    chat_template: bool = Field(default=False, description="the bundle carries a chat template: 'messages' "
                                "are rendered with it")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Status(BaseModel):
    status: str


# ---- ecosystem compatibility (service/compat.py): OpenRLHF /get_reward, vLLM /classify, TEI /predict
#
# These mirror other projects' wire formats, so unlike the /v1 models above they ignore unknown
# fields (clients send extras such as OpenRLHF's "datasources" or vLLM's "priority"). Types stay strict,
# and the schema says everything the server checks (blank texts, empty lists, the two /classify forms).

class _CompatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


_TEXT_SCHEMA = next(m.json_schema for m in Text.__metadata__ if isinstance(m, WithJsonSchema))


def _text(value, where: str) -> str:
    def fail(message):
        raise FieldError(where, message) if where else ValueError(message)

    if not isinstance(value, str):
        fail("must be a string")
    if not value.strip():
        fail("must not be empty or whitespace-only")
    return value


def _texts(value) -> list[str]:
    """A non-blank string or a non-empty list of them → the list (errors name the index: query.3)."""
    if isinstance(value, str):
        return [_text(value, "")]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string or a non-empty list of strings")
    return [_text(v, str(i)) for i, v in enumerate(value)]


TextOrTexts = Annotated[list[StrictStr], BeforeValidator(_texts), WithJsonSchema(
    {"anyOf": [_TEXT_SCHEMA, {"type": "array", "items": _TEXT_SCHEMA, "minItems": 1}]})]


def _predict_inputs(value):
    """TEI's PredictInput: a string, a [text] / [prompt, response] list, or a non-empty batch of such lists."""
    def sequence(v, where):
        if not isinstance(v, list) or not 1 <= len(v) <= 2:
            message = "must be [text] or [prompt, response]"
            raise FieldError(where, message) if where else ValueError(
                message + " (a batch is a list of such lists)")
        return [_text(t, f"{where}.{j}" if where else str(j)) for j, t in enumerate(v)]

    if isinstance(value, str):
        return _text(value, "")
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a [text] or [prompt, response] list, or a non-empty batch of such lists")
    if isinstance(value[0], list):
        return [sequence(v, str(i)) for i, v in enumerate(value)]
    return sequence(value, "")


_PAIR_SCHEMA = {"type": "array", "items": _TEXT_SCHEMA, "minItems": 1, "maxItems": 2}
PredictInputs = Annotated[StrictStr | list[StrictStr] | list[list[StrictStr]], BeforeValidator(_predict_inputs),
                          WithJsonSchema({"anyOf": [_TEXT_SCHEMA, _PAIR_SCHEMA,
                                                    {"type": "array", "items": _PAIR_SCHEMA, "minItems": 1}]})]


class ChatMessage(_CompatRequest):
    role: Literal["system", "user", "human", "assistant"]
    content: StrictStr


class GetRewardRequest(_CompatRequest):
    """OpenRLHF's remote reward model call (openrlhf/utils/remote_rm_utils.py)."""

    query: TextOrTexts = Field(
        description="prompt + response as one templated text each, special tokens kept (what OpenRLHF decodes "
        "from its rollouts)")
    prompts: list[StrictStr | None] | None = Field(default=None, description="the prompt part of each query, one "
                                                   "per query; where a query starts with it, the response starts "
                                                   "right after")
    labels: list | None = Field(default=None, description="accepted and ignored (a reward model needs no labels)")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="per query: the z-score (raw - mean) / std against the bundle's "
                                 "reference set, OpenRLHF's normalize_reward semantics; raw with ?normalize=false")
    scores: list[float] = Field(description="per query: percentile rank / 100, in [0, 1] (what OpenRLHF's dynamic "
                                "filtering expects)")
    extra_logs: dict[str, list[float]] = Field(description="per-query numbers OpenRLHF logs: raw_reward, "
                                               "reward_zscore, reward_percentile, n_tokens, truncated, n_warnings")
    warnings: list[list[str]] | None = Field(default=None, description="per query, present only if any query has "
                                             "warnings (OpenRLHF ignores this key)")


class ClassifyRequest(_CompatRequest):
    """vLLM's /classify (pooling API), as verl's reward loop calls it: `input` or `messages`."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [
        {"title": "text", "required": ["input"],
         "properties": {"input": {"not": {"type": "null"}}, "messages": {"type": "null"}}},
        {"title": "chat", "required": ["messages"],
         "properties": {"messages": {"type": "array"}, "input": {"type": "null"}}},
    ]})

    model: StrictStr | None = Field(default=None, description="accepted and echoed as the served bundle's name "
                                    "(verl sends a local path here)")
    input: TextOrTexts | None = Field(
        default=None, description="templated text(s), special tokens kept")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = Field(
        default=None, description="instead of input: one chat, rendered with the bundle's chat template (without "
        "one, the last message must be the assistant's)")
    activation: StrictBool | None = Field(default=None, description="vLLM < 0.11.2 name of use_activation")
    use_activation: StrictBool | None = Field(default=None, description="true (default): probs = [sigmoid(raw)]; "
                                              "false: probs = [raw]")
    add_special_tokens: StrictBool = Field(default=True, description="accepted; the server always adds the "
                                           "tokenizer's special tokens once, dropping a duplicate BOS from the text")
    truncate: StrictBool = Field(default=True, description="rewardserve extension: false turns over-long input "
                                 "into a 422 instead of cutting it (the response end is kept)")

    @model_validator(mode="after")
    def _one_form(self) -> "ClassifyRequest":
        if (self.input is None) == (self.messages is None):
            raise FieldError("input", "give either 'input' or 'messages'")
        return self


class ClassifyData(BaseModel):
    index: int
    label: str = "LABEL_0"
    probs: list[float]
    num_classes: int = 1
    warnings: list[str] | None = None


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


class PredictRequest(_CompatRequest):
    """text-embeddings-inference's /predict (router/src/http/types.rs): a string, a [text] or
    [prompt, response] list, or a batch of such lists."""

    inputs: PredictInputs
    raw_scores: StrictBool = Field(default=False, description="false (TEI's default for a one-label head): "
                                   "score = sigmoid(raw); true: the raw reward")
    truncate: StrictBool = Field(default=False, description="TEI's default: over-long input is an error; true cuts "
                                 "it (the response end is kept)")


class Prediction(BaseModel):
    score: float
    label: str = "LABEL_0"
