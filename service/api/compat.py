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
import re
import struct
import time
import uuid
from typing import Callable, Sequence

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.errors import ApiError
from service.api.routes import scoring_call, sigmoid
from service.chat import ChatTemplateError, Pair
from service.compat_protocol import (ChatMessage, ClassifyData, ClassifyRequest,
                                     ClassifyResponse, ClassifyUsage, EmbeddingData, EmbeddingsRequest,
                                     EmbeddingsResponse, GetRewardRequest, GetRewardResponse, PoolingData,
                                     PoolingRequest, PoolingResponse, Prediction, PredictRequest, Rank,
                                     RerankRequest, TeiRequest)
from service.engine import Call, Engine, Item, first_too_long
from service.protocol import ScoreResult

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

    # ---- text → pairs → results

    def is_empty(response: str) -> bool:
        for token in (engine.chat.eos_text, engine.chat.special_tokens.get("pad_token")):
            if token:
                response = response.replace(token, "")
        return not response.strip()

    def serve_rm_strip(text: str) -> str:
        """OpenRLHF serve_rm's strip_sequence + eos, for a tokenizer whose pad token is its EOS: runs of it at
        both ends are padding (left-padded prompts, right-padded rollouts); one EOS ends the text again. Other
        pad tokens are dropped by prepare_text."""
        chat = engine.chat
        eos, pad = chat.eos_text, chat.special_tokens.get("pad_token") or chat.pad_text
        if not eos or pad != eos:
            return text
        run = f"(?:{re.escape(eos)})+"
        inner = re.sub(f"^{run}", "", text)
        core = re.sub(f"{run}$", "", inner)
        if core != inner and not core.rstrip().endswith(eos):
            core += eos  # the rollout ended with EOS: keep exactly one (append_eos bundles: prepare_text drops it)
        return core

    async def score_pairs(call: Call, pairs: list[Pair], truncate: bool, field: Callable[[int], str],
                          route: str) -> list[ScoreResult]:
        fits_nothing = engine.encoder.n_special == 0  # a format that adds no token: an empty pair is no input
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
        results = first_too_long(await engine.score(call, items, whole=True))
        empty = [i for i, p in enumerate(pairs) if is_empty(p.response)]
        for i in empty:
            results[i] = results[i].model_copy(update={"warnings": (results[i].warnings or []) + [EMPTY_RESPONSE]})
        if empty:
            log.warning("%s: %d of %d items have an empty response (scored; see docs/integrations.md)", route,
                        len(empty), len(pairs))
        return results

    def messages_pair(messages: list[ChatMessage]) -> Pair:
        """vLLM's chat form: rendered with the bundle's chat template."""
        chat = [m.model_dump() for m in messages]
        try:
            if chat[-1]["role"] == "assistant":
                return engine.chat.messages_to_pair(chat)
            if engine.chat.has_template:  # e.g. a chat ending on a user turn: score the rendering as is
                return engine.chat.prepare_text(engine.chat.render(chat))
        except (ChatTemplateError, ValueError) as exc:
            raise ApiError(422, "validation_error", f"messages: {exc}", "messages") from None
        last = f"messages.{len(chat) - 1}.role"
        raise ApiError(422, "validation_error", f"{last}: the last message must be the assistant's response (this "
                       "bundle has no chat template to render other chats with)", last)

    async def input_pairs(inputs: list[str | list[int]]) -> list[Pair]:
        """vLLM/OpenAI `input` items → pairs; token ids are decoded with the bundle's tokenizer, specials kept."""
        vocab = engine.encoder.tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [(i, x) for i, x in enumerate(inputs) if isinstance(x, list)]
        for i, seq in ids:
            bad = next((t for t in seq if t >= vocab), None)
            if bad is not None:
                raise ApiError(422, "validation_error", f"input: token id {bad} (item {i}) is outside the "
                               f"vocabulary of {vocab} tokens", "input")
        texts = list(inputs)
        if ids:
            decoded = await asyncio.to_thread(engine.encoder.tokenizer.decode_batch, [seq for _, seq in ids],
                                              skip_special_tokens=False)
            for (i, _), text in zip(ids, decoded):
                texts[i] = text
        return [engine.chat.prepare_text(t) for t in texts]

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
        pairs = [engine.chat.prepare_text(serve_rm_strip(q), serve_rm_strip(p) if p else p)
                 for q, p in zip(queries, prompts)]
        results = await score_pairs(call, pairs, True, lambda i: f"query.{i}", GET_REWARD)
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

    async def vllm_results(body: ClassifyRequest, call: Call, route: str) -> list[ScoreResult]:
        if body.messages is not None:
            return await score_pairs(call, [messages_pair(body.messages)], body.truncate, lambda i: "messages", route)
        return await score_pairs(call, await input_pairs(body.input), body.truncate, lambda i: f"input.{i}", route)

    @app.post(CLASSIFY, response_model=ClassifyResponse, response_model_exclude_none=True, **compat)
    async def classify(body: ClassifyRequest, call: Call = Depends(scoring_call)):
        """vLLM /classify for a one-label reward head: probs = [raw] with use_activation (or activation)
        false, [sigmoid(raw)] otherwise (vLLM's default for one label). `messages` are rendered with
        the bundle's chat template; token-id `input` is decoded with the bundle's tokenizer."""
        results = await vllm_results(body, call, CLASSIFY)
        activation = body.use_activation if body.use_activation is not None else body.activation
        activation = True if activation is None else activation
        data = [ClassifyData(index=i, probs=[sigmoid(r.raw) if activation else r.raw], warnings=r.warnings)
                for i, r in enumerate(results)]
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                                model=engine.manifest.name, data=data, usage=usage(results))

    @app.post(POOLING, response_model=PoolingResponse, response_model_exclude_none=True, **compat)
    async def pooling(body: PoolingRequest, call: Call = Depends(scoring_call)):
        """vLLM /pooling for a sequence reward model: each data is [raw reward] (no activation, as vLLM's
        reward pooling; use_activation true: [sigmoid(raw)]); base64 encoding_format: little-endian float32."""
        results = await vllm_results(body, call, POOLING)
        activation = body.use_activation if body.use_activation is not None else body.activation
        values = [[sigmoid(r.raw) if activation else r.raw] for r in results]
        data = [PoolingData(index=i, data=_float32_base64(v) if body.encoding_format == "base64" else v,
                            warnings=r.warnings) for i, (v, r) in enumerate(zip(values, results))]
        return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=engine.manifest.name,
                               data=data, usage=usage(results))

    @app.post(EMBEDDINGS, response_model=EmbeddingsResponse, response_model_exclude_none=True, **compat)
    async def embeddings(body: EmbeddingsRequest, call: Call = Depends(scoring_call)):
        """OpenAI embeddings as SGLang answers for a reward model: `embedding` = [raw reward] (verl's SGLang
        reward branch reads data[i].embedding[0]); base64 encoding_format: little-endian float32."""
        results = await score_pairs(call, await input_pairs(body.input), body.truncate, lambda i: f"input.{i}",
                                    EMBEDDINGS)
        data = [EmbeddingData(index=i, embedding=_float32_base64([r.raw]) if body.encoding_format == "base64"
                              else [r.raw], warnings=r.warnings) for i, r in enumerate(results)]
        return EmbeddingsResponse(id=f"embd-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=engine.manifest.name, data=data, usage=usage(results))

    # ---- text-embeddings-inference

    async def predict_answer(body: PredictRequest, call: Call):
        inputs = body.inputs
        batch = isinstance(inputs, list) and isinstance(inputs[0], list)
        sequences = inputs if batch else [[inputs] if isinstance(inputs, str) else inputs]
        pairs = [engine.chat.prepare_text(seq[0]) if len(seq) == 1 else
                 engine.chat.prepare_text(seq[0] + seq[1], seq[0] or None) for seq in sequences]
        results = await score_pairs(call, pairs, bool(body.truncate),
                                    (lambda i: f"inputs.{i}") if batch else (lambda i: "inputs"), PREDICT)
        out = [[Prediction(score=r.raw if body.raw_scores else sigmoid(r.raw))] for r in results]
        return out if batch else out[0]

    async def rerank_answer(body: RerankRequest, call: Call):
        pairs = [engine.chat.prepare_text(body.query + text, body.query) for text in body.texts]
        results = await score_pairs(call, pairs, bool(body.truncate), lambda i: f"texts.{i}", RERANK)
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
