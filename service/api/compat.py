"""Ecosystem routes: the wire formats RLHF stacks already speak, served by the same scoring path as /v1.

  POST /get_reward      OpenRLHF's remote reward model (`--reward.remote_url http://host:8000/get_reward`)
  POST /classify        vLLM's pooling /classify, as verl's reward loop calls it
  POST /pooling         vLLM's /pooling for a reward model: data = [reward]
  POST /v1/embeddings   OpenAI embeddings as SGLang serves a reward model: embedding = [reward]
  POST /predict         text-embeddings-inference's /predict (raw_scores, truncate)
  POST /rerank          text-embeddings-inference's /rerank: each text scored as the response to the query
  POST / , /invocations text-embeddings-inference's SageMaker-style routes: `inputs` → predict, `query` +
                        `texts` → rerank (huggingface_hub's InferenceClient posts here)

All take templated text with its special tokens kept (vLLM routes also token ids, decoded with the
bundle's tokenizer) and turn it into the (prompt, response) pair the model was trained on with
service/chat.py (`ChatFormat.prepare_text`): padding dropped, a BOS the tokenizer adds anyway dropped, the
response found after the given prompt, else after the chat template's last assistant-turn opener, else
after the last "\\n\\nAssistant:", else the whole text is the response. /get_reward first does what
OpenRLHF's own serve_rm does when the tokenizer's pad token is its EOS (the queries of OpenRLHF <= 0.8.2
arrive padded with it): strip runs of it at both ends and keep one EOS at the end. Every item then goes
through Engine.score (admission, tokenization, the batcher, the score cache, the warnings), exactly like
/v1/score. A list (a rollout batch) is one unit of admission: admitted or refused (503/429 + Retry-After,
or 413 when it could never fit) as a whole before any compute, its chunks of max_client_batch tokenized
concurrently and queued at once, so nothing computed is thrown away by a later refusal.

An empty response (a legitimate rollout outcome) is scored as the model sees it and flagged
`empty_response` (in the body where the wire format has warnings, in the log otherwise). The routes'
bodies may be up to max_compat_body_bytes (RLHF batches), not max_body_bytes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import uuid
from typing import Callable, Sequence

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.errors import ApiError
from service.api.routes import scoring_call
from service.chat import ChatTemplateError, Pair
from service.compat_protocol import (ChatMessage, ClassifyData, ClassifyRequest,
                                     ClassifyResponse, ClassifyUsage, EmbeddingData, EmbeddingsRequest,
                                     EmbeddingsResponse, GetRewardRequest, GetRewardResponse, PoolingData,
                                     PoolingRequest, PoolingResponse, Prediction, PredictRequest, Rank,
                                     RerankRequest, TeiRequest)
from service.engine import Call, Engine, Item, first_too_long
from service.protocol import ScoreResult
from service.model_texts import ModelTexts
from service.served_model import sigmoid

log = logging.getLogger("rewardserve.compat")

GET_REWARD, CLASSIFY, POOLING, EMBEDDINGS = "/get_reward", "/classify", "/pooling", "/v1/embeddings"
PREDICT, RERANK, TEI_ROOT, INVOCATIONS = "/predict", "/rerank", "/", "/invocations"
# Every route add_compat_routes registers (the body-limit middleware gives them max_compat_body_bytes).
COMPAT_PATHS = (GET_REWARD, CLASSIFY, POOLING, EMBEDDINGS, PREDICT, RERANK, TEI_ROOT, INVOCATIONS)

EMPTY_RESPONSE = ("empty_response: the response is empty; it was scored as the model sees it (the prompt "
                  "followed by nothing but the special tokens the format adds)")


def _float32_base64(values: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def add_compat_routes(app: FastAPI, engine: Engine, responses: dict, dependencies: list) -> None:
    """The ecosystem routes (under `dependencies`: auth). Their body limit (max_compat_body_bytes, for
    COMPAT_PATHS) is applied by create_app; their token-id range by service/api/openapi.py."""
    compat = dict(responses=responses, tags=["compatibility"], dependencies=dependencies)

    # ---- text → pairs → results (each model's own text handling: engine.texts)

    async def score_pairs(call: Call, model: str | None, texts: ModelTexts, pairs: list[Pair], truncate: bool,
                          field: Callable[[int], str], route: str) -> list[ScoreResult]:
        fits_nothing = not texts.adds_special_tokens  # a format that adds no token: an empty pair is no input
        for i, p in enumerate(pairs):
            if fits_nothing and not (p.prompt.strip() or p.response.strip()):
                raise ApiError(422, "validation_error", f"{field(i)}: nothing to score once special tokens and "
                               "padding are removed", field(i))
        if not pairs:
            return []
        # One rollout batch is one unit: admitted or refused as a whole before any compute, its chunks of
        # max_client_batch tokenized concurrently and queued at once (the batcher mixes them into its runs),
        # an item too long for a client that asked for no truncation refused before anything runs.
        items = [Item(p.prompt, p.response, truncate, field(i), field(i)) for i, p in enumerate(pairs)]
        results = first_too_long(await engine.score(call, items, model, whole=True))
        empty = [i for i, p in enumerate(pairs) if texts.is_empty(p.response)]
        for i in empty:
            results[i] = results[i].model_copy(update={"warnings": (results[i].warnings or []) + [EMPTY_RESPONSE]})
        if empty:
            log.warning("%s: %d of %d items have an empty response (scored; see docs/integrations.md)", route,
                        len(empty), len(pairs))
        return results

    def messages_pair(texts: ModelTexts, messages: list[ChatMessage]) -> Pair:
        """vLLM's chat form: rendered with the bundle's chat template."""
        chat = [m.model_dump() for m in messages]
        try:
            if chat[-1]["role"] == "assistant":
                return texts.messages_to_pair(chat)
            if texts.has_template:  # e.g. a chat ending on a user turn: score the rendering as is
                return texts.render_to_pair(chat)
        except (ChatTemplateError, ValueError) as exc:
            raise ApiError(422, "validation_error", f"messages: {exc}", "messages") from None
        last = f"messages.{len(chat) - 1}.role"
        raise ApiError(422, "validation_error", f"{last}: the last message must be the assistant's response (this "
                       "bundle has no chat template to render other chats with)", last)

    async def input_pairs(texts: ModelTexts, inputs: list[str | list[int]]) -> list[Pair]:
        """vLLM/OpenAI `input` items → pairs; token ids are decoded with the bundle's tokenizer, specials kept."""
        vocab = texts.vocab_size
        ids = [(i, x) for i, x in enumerate(inputs) if isinstance(x, list)]
        for i, seq in ids:
            bad = next((t for t in seq if t >= vocab), None)
            if bad is not None:
                raise ApiError(422, "validation_error", f"input: token id {bad} (item {i}) is outside the "
                               f"vocabulary of {vocab} tokens", "input")
        strings = list(inputs)
        if ids:
            decoded = await asyncio.to_thread(texts.decode, [seq for _, seq in ids])
            for (i, _), text in zip(ids, decoded):
                strings[i] = text
        return [texts.prepare_text(t) for t in strings]

    def usage(results: list[ScoreResult]) -> ClassifyUsage:
        tokens = sum(r.n_tokens for r in results)
        return ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens)

    # ---- OpenRLHF

    @app.post(GET_REWARD, response_model=GetRewardResponse, response_model_exclude_none=True, **compat)
    async def get_reward(body: GetRewardRequest, call: Call = Depends(scoring_call), normalize: bool = True):
        """OpenRLHF remote reward model. `rewards` are z-scores against the bundle's reference set
        (OpenRLHF's normalize_reward semantics; `?normalize=false` for raw rewards); `scores` are
        percentile / 100 in [0, 1]; `extra_logs` holds per-query numbers, raw included. Empty `query`
        answers empty lists."""
        queries = body.query  # a single string arrives as a one-item list
        prompts = body.prompts if body.prompts is not None else [None] * len(queries)
        if len(prompts) != len(queries):
            raise ApiError(422, "validation_error", f"prompts: {len(prompts)} prompts for {len(queries)} queries; "
                           "give one per query (or none)", "prompts")
        texts = engine.texts(None)  # OpenRLHF names no model: the default
        pairs = [texts.prepare_text(texts.serve_rm_strip(q), texts.serve_rm_strip(p) if p else p)
                 for q, p in zip(queries, prompts)]
        results = await score_pairs(call, None, texts, pairs, True, lambda i: f"query.{i}", GET_REWARD)
        warnings = [r.warnings or [] for r in results]
        return GetRewardResponse(
            rewards=[r.score if normalize else r.raw for r in results],
            scores=[r.percentile / 100.0 for r in results],
            extra_logs={"raw_reward": [r.raw for r in results], "reward_zscore": [r.score for r in results],
                        "reward_percentile": [r.percentile for r in results],
                        "n_tokens": [float(r.n_tokens) for r in results],
                        "truncated": [float(r.truncated) for r in results],
                        "n_warnings": [float(len(w)) for w in warnings]},
            warnings=warnings if any(warnings) else None)

    # ---- vLLM / SGLang

    async def vllm_results(body: ClassifyRequest, model: str | None, call: Call, route: str) -> list[ScoreResult]:
        texts = engine.texts(model)
        if body.messages is not None:
            return await score_pairs(call, model, texts, [messages_pair(texts, body.messages)], body.truncate,
                                     lambda i: "messages", route)
        return await score_pairs(call, model, texts, await input_pairs(texts, body.input), body.truncate,
                                 lambda i: f"input.{i}", route)

    @app.post(CLASSIFY, response_model=ClassifyResponse, response_model_exclude_none=True, **compat)
    async def classify(body: ClassifyRequest, call: Call = Depends(scoring_call)):
        """vLLM /classify for a one-label reward head: probs = [raw] with use_activation (or activation)
        false, [sigmoid(raw)] otherwise (vLLM's default for one label). `messages` are rendered with
        the bundle's chat template; token-id `input` is decoded with the bundle's tokenizer."""
        model = engine.compat_model(body.model)
        results = await vllm_results(body, model, call, CLASSIFY)
        activation = body.use_activation if body.use_activation is not None else body.activation
        activation = True if activation is None else activation
        data = [ClassifyData(index=i, probs=[sigmoid(r.raw) if activation else r.raw], warnings=r.warnings)
                for i, r in enumerate(results)]
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                                model=engine.model_name(model), data=data, usage=usage(results))

    @app.post(POOLING, response_model=PoolingResponse, response_model_exclude_none=True, **compat)
    async def pooling(body: PoolingRequest, call: Call = Depends(scoring_call)):
        """vLLM /pooling for a sequence reward model: each data is [raw reward] (no activation, as vLLM's
        reward pooling; use_activation true: [sigmoid(raw)]); base64 encoding_format: little-endian float32."""
        model = engine.compat_model(body.model)
        results = await vllm_results(body, model, call, POOLING)
        activation = body.use_activation if body.use_activation is not None else body.activation
        values = [[sigmoid(r.raw) if activation else r.raw] for r in results]
        data = [PoolingData(index=i, data=_float32_base64(v) if body.encoding_format == "base64" else v,
                            warnings=r.warnings) for i, (v, r) in enumerate(zip(values, results))]
        return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()),
                               model=engine.model_name(model), data=data, usage=usage(results))

    @app.post(EMBEDDINGS, response_model=EmbeddingsResponse, response_model_exclude_none=True, **compat)
    async def embeddings(body: EmbeddingsRequest, call: Call = Depends(scoring_call)):
        """OpenAI embeddings as SGLang answers for a reward model: `embedding` = [raw reward] (verl's SGLang
        reward branch reads data[i].embedding[0]); base64 encoding_format: little-endian float32."""
        model = engine.compat_model(body.model)
        texts = engine.texts(model)
        results = await score_pairs(call, model, texts, await input_pairs(texts, body.input), body.truncate,
                                    lambda i: f"input.{i}", EMBEDDINGS)
        data = [EmbeddingData(index=i, embedding=_float32_base64([r.raw]) if body.encoding_format == "base64"
                              else [r.raw], warnings=r.warnings) for i, r in enumerate(results)]
        return EmbeddingsResponse(id=f"embd-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=engine.model_name(model), data=data, usage=usage(results))

    # ---- text-embeddings-inference

    async def predict_answer(body: PredictRequest, call: Call):
        inputs = body.inputs
        batch = isinstance(inputs, list) and isinstance(inputs[0], list)
        sequences = inputs if batch else [[inputs] if isinstance(inputs, str) else inputs]
        texts = engine.texts(None)  # TEI names no model: the default
        pairs = [texts.prepare_text(seq[0]) if len(seq) == 1 else
                 texts.prepare_text(seq[0] + seq[1], seq[0] or None) for seq in sequences]
        results = await score_pairs(call, None, texts, pairs, bool(body.truncate),
                                    (lambda i: f"inputs.{i}") if batch else (lambda i: "inputs"), PREDICT)
        out = [[Prediction(score=r.raw if body.raw_scores else sigmoid(r.raw))] for r in results]
        return out if batch else out[0]

    async def rerank_answer(body: RerankRequest, call: Call):
        texts = engine.texts(None)  # TEI names no model: the default
        pairs = [texts.prepare_text(body.query + text, body.query) for text in body.texts]
        results = await score_pairs(call, None, texts, pairs, bool(body.truncate), lambda i: f"texts.{i}", RERANK)
        ranks = [Rank(index=i, score=r.raw if body.raw_scores else sigmoid(r.raw),
                      text=body.texts[i] if body.return_text else None) for i, r in enumerate(results)]
        return sorted(ranks, key=lambda r: -r.score)  # stable: ties keep input order

    @app.post(PREDICT, response_model=list[Prediction] | list[list[Prediction]], **compat)
    async def predict(body: PredictRequest, call: Call = Depends(scoring_call)):
        """TEI /predict for a one-label head: score = sigmoid(raw) unless raw_scores is true. A single
        input answers [prediction]; a batch answers [[prediction], ...]."""
        return await predict_answer(body, call)

    @app.post(RERANK, response_model=list[Rank], response_model_exclude_none=True, **compat)
    async def rerank(body: RerankRequest, call: Call = Depends(scoring_call)):
        """TEI /rerank: each text scored as the response to `query`; [{index, score, text?}] by score,
        highest first; score = sigmoid(raw) unless raw_scores is true."""
        return await rerank_answer(body, call)

    async def tei_dispatch(body: TeiRequest, call: Call):
        data = body.model_dump()
        try:
            if "inputs" in data:
                return await predict_answer(PredictRequest.model_validate(data), call)
            if "query" in data or "texts" in data:
                return await rerank_answer(RerankRequest.model_validate(data), call)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        raise ApiError(422, "validation_error", "inputs: field required (TEI predict: 'inputs'; TEI rerank: 'query' "
                       "and 'texts')", "inputs")

    tei_doc = ("TEI's SageMaker-style route: a body with `inputs` is a /predict, one with `query` and `texts` a "
               "/rerank, answered as those routes answer.")
    for path in (TEI_ROOT, INVOCATIONS):
        @app.post(path, response_model=list[Prediction] | list[list[Prediction]] | list[Rank],
                  response_model_exclude_none=True, description=tei_doc, name=f"tei{path.replace('/', '_')}",
                  **compat)
        async def tei_route(body: TeiRequest, call: Call = Depends(scoring_call)):
            return await tei_dispatch(body, call)

    registered = {r.path for r in app.routes if "compatibility" in (getattr(r, "tags", None) or [])}
    assert registered == set(COMPAT_PATHS), registered ^ set(COMPAT_PATHS)
