"""Wire models of the ecosystem routes (service/api/compat.py): OpenRLHF /get_reward, vLLM /classify, TEI /predict.

These mirror other projects' wire formats, so unlike the /v1 models (service/protocol.py) they ignore unknown
fields (clients send extras such as OpenRLHF's "datasources" or vLLM's "priority"). Types stay strict,
and the schema says everything the server checks (blank texts, empty lists, the two /classify forms).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema, model_validator

from service.protocol import FieldError, Text, UnicodeChecked


class _CompatRequest(UnicodeChecked):
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
