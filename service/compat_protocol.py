"""Wire models of the ecosystem routes (service/api/compat.py): OpenRLHF /get_reward; vLLM /classify, /pooling and
OpenAI-style /v1/embeddings; TEI /predict, /rerank and its SageMaker-style POST / and /invocations.

These mirror other projects' wire formats, so unlike the /v1 models (service/protocol.py) they ignore unknown
fields (clients send extras such as OpenRLHF's "datasources" or vLLM's "priority"). Types stay strict,
and the schema says everything the server checks (blank texts, empty lists, the two /classify forms).
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema, model_validator

from service.protocol import FieldError, Message, Text, UnicodeChecked, whole_number


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


def _texts(value, allow_empty: bool = False) -> list[str]:
    """A non-blank string or a non-empty list of them → the list (errors name the index: query.3)."""
    if isinstance(value, str):
        return [_text(value, "")]
    if not isinstance(value, list) or not (value or allow_empty):
        raise ValueError("must be a string or a non-empty list of strings")
    return [_text(v, str(i)) for i, v in enumerate(value)]


TextOrTexts = Annotated[list[StrictStr], BeforeValidator(_texts), WithJsonSchema(
    {"anyOf": [_TEXT_SCHEMA, {"type": "array", "items": _TEXT_SCHEMA, "minItems": 1}]})]
# OpenRLHF shards a rollout batch over its reward servers: with fewer samples than servers a server gets [].
TextOrTextsOrNone = Annotated[list[StrictStr], BeforeValidator(lambda v: _texts(v, allow_empty=True)),
                              WithJsonSchema({"anyOf": [_TEXT_SCHEMA, {"type": "array", "items": _TEXT_SCHEMA}]})]

# The description marks the token-id schemas: the served app adds `maximum` (the bundle's vocabulary size - 1)
# to each at /openapi.json time (service/api/compat.py), since the range is the bundle's, not the code's.
TOKEN_ID_DESCRIPTION = "a token id of the bundle's tokenizer"
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "description": TOKEN_ID_DESCRIPTION}
_IDS_SCHEMA = {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1}


def _ids(value, where: str) -> list[int]:
    """A non-empty list of token ids (integers >= 0; JSON's 3.0 is the integer 3). The upper bound (the
    vocabulary) is the bundle's: the route checks it."""
    def fail(at, message):
        raise FieldError(at, message) if at else ValueError(message)

    if not isinstance(value, list) or not value:
        fail(where, "must be a non-empty list of token ids")
    out = []
    for j, v in enumerate(value):
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        if isinstance(v, bool) or not whole or v < 0:
            fail(f"{where}.{j}" if where else str(j), "must be a token id (an integer >= 0)")
        out.append(int(v))
    return out


def _model_input(value) -> list[str | list[int]]:
    """vLLM/OpenAI `input`: a text, a non-empty list of texts, a list of token ids, or a non-empty list of
    such lists → a list of items, each a text or a list of ids (errors name the index: input.2.5)."""
    if isinstance(value, str):
        return [_text(value, "")]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a non-empty list of strings, a non-empty list of token ids, or a "
                         "non-empty list of such lists")
    first = value[0]
    if isinstance(first, str):
        return [_text(v, str(i)) for i, v in enumerate(value)]
    if isinstance(first, list):
        return [_ids(v, str(i)) for i, v in enumerate(value)]
    return [_ids(value, "")]


ModelInput = Annotated[list[StrictStr | list[int]], BeforeValidator(_model_input), WithJsonSchema(
    {"anyOf": [_TEXT_SCHEMA, {"type": "array", "items": _TEXT_SCHEMA, "minItems": 1}, _IDS_SCHEMA,
               {"type": "array", "items": _IDS_SCHEMA, "minItems": 1}]})]


def _predict_inputs(value):
    """TEI's PredictInput: a string, a [text] / [prompt, response] list, or a non-empty batch of such lists.
    A [prompt, response] pair may hold empty strings (an empty completion is a rollout outcome)."""
    def sequence(v, where):
        if not isinstance(v, list) or not 1 <= len(v) <= 2:
            message = "must be [text] or [prompt, response]"
            raise FieldError(where, message) if where else ValueError(
                message + " (a batch is a list of such lists)")
        if len(v) == 1:
            return [_text(v[0], f"{where}.0" if where else "0")]
        for j, t in enumerate(v):
            if not isinstance(t, str):
                at = f"{where}.{j}" if where else str(j)
                raise FieldError(at, "must be a string")
        return list(v)

    if isinstance(value, str):
        return _text(value, "")
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a [text] or [prompt, response] list, or a non-empty batch of such lists")
    if isinstance(value[0], list):
        return [sequence(v, str(i)) for i, v in enumerate(value)]
    return sequence(value, "")


_PAIR_SCHEMA = {"anyOf": [{"type": "array", "items": _TEXT_SCHEMA, "minItems": 1, "maxItems": 1},
                          {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}]}
PredictInputs = Annotated[StrictStr | list[StrictStr] | list[list[StrictStr]], BeforeValidator(_predict_inputs),
                          WithJsonSchema({"anyOf": [_TEXT_SCHEMA, _PAIR_SCHEMA,
                                                    {"type": "array", "items": _PAIR_SCHEMA, "minItems": 1}]})]


ChatMessage = Message  # the compat routes' former name for it (service/api/compat.py imports it)


class GetRewardRequest(_CompatRequest):
    """OpenRLHF's remote reward model call (openrlhf/utils/remote_rm_utils.py)."""

    query: TextOrTextsOrNone = Field(
        description="prompt + response as one templated text each, special tokens kept (what OpenRLHF decodes "
        "from its rollouts); [] answers empty lists (OpenRLHF sends it to a server its shard left empty)")
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
    input: ModelInput | None = Field(
        default=None, description="templated text(s), special tokens kept; or token ids (a list, or a list of "
        "lists), decoded with the bundle's tokenizer (special tokens kept) and then read as text")
    messages: Annotated[list[Message], Field(min_length=1)] | None = Field(
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


class UsageInfo(BaseModel):
    """Tokens the model saw (vLLM's UsageInfo): a reward model generates nothing, so completion_tokens is 0."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


ClassifyUsage = UsageInfo  # its former name (service/api/compat.py imports it)
DataT = TypeVar("DataT")


class ListResponse(BaseModel, Generic[DataT]):
    """The one envelope of the vLLM/OpenAI-style answers (/classify, /pooling, /v1/embeddings), as vLLM's
    OpenAIBaseModel responses share theirs: each route subclasses it with its own data item. Generic over the
    item so that `data` stays between `model` and `usage` (the wire's field order, byte for byte)."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[DataT]
    usage: UsageInfo


class ClassifyResponse(ListResponse[ClassifyData]):
    pass


class PredictRequest(_CompatRequest):
    """text-embeddings-inference's /predict (router/src/http/types.rs): a string, a [text] or
    [prompt, response] list, or a batch of such lists."""

    inputs: PredictInputs
    raw_scores: StrictBool = Field(default=False, description="false (TEI's default for a one-label head): "
                                   "score = sigmoid(raw); true: the raw reward")
    truncate: StrictBool | None = Field(default=None, description="false or null (TEI's default): over-long input "
                                        "is an error; true cuts it (the response end is kept)")


class Prediction(BaseModel):
    score: float
    label: str = "LABEL_0"


class RerankRequest(_CompatRequest):
    """text-embeddings-inference's /rerank: every text scored as the response to `query` (the prompt)."""

    query: Text = Field(description="the prompt")
    texts: Annotated[list[StrictStr], Field(min_length=1)] = Field(description="the candidate responses (an empty "
                                                                  "one is scored, flagged empty_response in the log)")
    raw_scores: StrictBool = Field(default=False, description="false: score = sigmoid(raw); true: the raw reward")
    return_text: StrictBool = Field(default=False, description="true: each rank carries its text")
    truncate: StrictBool | None = Field(default=None, description="false or null (TEI's default): over-long input "
                                        "is an error; true cuts it (the response end is kept)")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class PoolingRequest(ClassifyRequest):
    """vLLM's /pooling for a reward model: `input` (texts or token ids) or `messages`; the pooled output of a
    one-label sequence reward model is [raw reward]."""

    encoding_format: Literal["float", "base64"] = Field(default="float", description="base64: each data is the "
                                                        "base64 of little-endian float32s")
    use_activation: StrictBool | None = Field(default=None, description="true: [sigmoid(raw)]; false or null "
                                              "(vLLM's reward pooling: no activation): [raw]")


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str
    warnings: list[str] | None = None


class PoolingResponse(ListResponse[PoolingData]):
    pass


class EmbeddingsRequest(_CompatRequest):
    """OpenAI /v1/embeddings as SGLang serves a reward model (`--is-embedding`): `embedding` is [raw reward]."""

    model: StrictStr | None = Field(default=None, description="accepted and echoed as the served bundle's name")
    input: ModelInput = Field(description="templated text(s), special tokens kept; or token ids (a list, or a list "
                              "of lists), decoded with the bundle's tokenizer and then read as text")
    encoding_format: Literal["float", "base64"] = Field(default="float", description="base64 (what the openai "
                                                        "Python client asks for): little-endian float32s")
    dimensions: Annotated[StrictInt, Field(ge=1, le=1), BeforeValidator(whole_number)] | None = Field(
        default=None, description="1 or null: a reward model's embedding is its one reward")
    user: StrictStr | None = None
    truncate: StrictBool = Field(default=True, description="rewardserve extension: false turns over-long input "
                                 "into a 422 instead of cutting it (the response end is kept)")


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    warnings: list[str] | None = None


class EmbeddingsResponse(ListResponse[EmbeddingData]):
    pass


class TeiRequest(UnicodeChecked):
    """TEI's POST / and /invocations: a /predict body (`inputs`) or a /rerank body (`query` + `texts`); the route
    validates it as the one it is."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"$ref": "#/components/schemas/PredictRequest"},
        {"allOf": [{"$ref": "#/components/schemas/RerankRequest"}], "not": {"required": ["inputs"]}},
    ]})
