"""Ecosystem routes: the wire formats RLHF stacks already speak, served by the same scoring path as /v1.

  POST /get_reward  OpenRLHF's remote reward model (`--remote_rm_url http://host:8000/get_reward`)
  POST /classify    vLLM's pooling /classify, as verl's reward loop calls it
  POST /predict     text-embeddings-inference's /predict (raw_scores, truncate)

All three take templated text with its special tokens kept and turn it into the (prompt, response)
pair the model was trained on with service/chat.py (`ChatFormat.prepare_text`): padding dropped, a BOS
the tokenizer adds anyway dropped, the response found after the given prompt, else after the chat
template's last assistant-turn opener, else after the last "\\n\\nAssistant:", else the whole text is
the response. Every item then goes through Engine.score (admission, tokenization, the batcher, the
score cache, the warnings), exactly like /v1/score; a list longer than max_client_batch is scored in
consecutive chunks of max_client_batch.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

from fastapi import Depends, FastAPI

from service.api.errors import ApiError
from service.api.routes import scoring_call, sigmoid
from service.chat import ChatTemplateError, Pair
from service.engine import Call, Engine, Item, first_too_long
from service.compat_protocol import (ClassifyData, ClassifyRequest, ClassifyResponse, ClassifyUsage,
                                     GetRewardRequest, GetRewardResponse, Prediction, PredictRequest)
from service.protocol import ScoreResult


def add_compat_routes(app: FastAPI, engine: Engine, responses: dict, dependencies: list) -> None:
    """The three routes (under `dependencies`: auth)."""
    settings = engine.settings

    async def score_pairs(call: Call, pairs: list[Pair], truncate: bool,
                          field: Callable[[int], str]) -> list[ScoreResult]:
        step = settings.max_client_batch
        results: list[ScoreResult] = []
        for start in range(0, len(pairs), step):  # consecutive chunks: each is admitted on its own
            items = [Item(p.prompt, p.response, truncate, field(start + k), field(start + k))
                     for k, p in enumerate(pairs[start:start + step])]
            results += first_too_long(await engine.score(call, items))
        return results

    @app.post("/get_reward", response_model=GetRewardResponse, response_model_exclude_none=True,
              responses=responses, tags=["compatibility"], dependencies=dependencies)
    async def get_reward(body: GetRewardRequest, call: Call = Depends(scoring_call), normalize: bool = True):
        """OpenRLHF remote reward model. `rewards` are z-scores against the bundle's reference set
        (OpenRLHF's normalize_reward semantics; `?normalize=false` for raw rewards); `scores` are
        percentile / 100 in [0, 1]; `extra_logs` holds per-query numbers, raw included."""
        queries = body.query  # a single string arrives as a one-item list
        prompts = body.prompts if body.prompts is not None else [None] * len(queries)
        if len(prompts) != len(queries):
            raise ApiError(422, "validation_error", f"prompts: {len(prompts)} prompts for {len(queries)} queries; "
                           "give one per query (or none)", "prompts")
        pairs = [engine.chat.prepare_text(q, p) for q, p in zip(queries, prompts)]
        results = await score_pairs(call, pairs, True, lambda i: f"query.{i}")
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

    @app.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses=responses, tags=["compatibility"], dependencies=dependencies)
    async def classify(body: ClassifyRequest, call: Call = Depends(scoring_call)):
        """vLLM /classify for a one-label reward head: probs = [raw] with use_activation (or activation)
        false, [sigmoid(raw)] otherwise (vLLM's default for one label). `messages` are rendered with
        the bundle's chat template."""
        if body.messages is not None:
            messages = [m.model_dump() for m in body.messages]
            try:
                if messages[-1]["role"] == "assistant":
                    pair = engine.chat.messages_to_pair(messages)
                elif engine.chat.has_template:  # e.g. a chat ending on a user turn: score the rendering as is
                    pair = engine.chat.prepare_text(engine.chat.render(messages))
                else:
                    last = f"messages.{len(messages) - 1}.role"
                    raise ApiError(422, "validation_error", f"{last}: the last message must be the assistant's "
                                   "response (this bundle has no chat template to render other chats with)", last)
            except (ChatTemplateError, ValueError) as exc:
                raise ApiError(422, "validation_error", f"messages: {exc}", "messages") from None
            pairs, field = [pair], (lambda i: "messages")
        else:
            pairs = [engine.chat.prepare_text(t) for t in body.input]
            field = (lambda i: f"input.{i}")
        results = await score_pairs(call, pairs, body.truncate, field)
        activation = body.use_activation if body.use_activation is not None else body.activation
        activation = True if activation is None else activation
        data = [ClassifyData(index=i, probs=[sigmoid(r.raw) if activation else r.raw], warnings=r.warnings)
                for i, r in enumerate(results)]
        tokens = sum(r.n_tokens for r in results)
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                                model=engine.manifest.name, data=data,
                                usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.post("/predict", response_model=list[Prediction] | list[list[Prediction]], responses=responses,
              tags=["compatibility"], dependencies=dependencies)
    async def predict(body: PredictRequest, call: Call = Depends(scoring_call)):
        """TEI /predict for a one-label head: score = sigmoid(raw) unless raw_scores is true. A single
        input answers [prediction]; a batch answers [[prediction], ...]."""
        inputs = body.inputs
        batch = isinstance(inputs, list) and isinstance(inputs[0], list)
        sequences = inputs if batch else [[inputs] if isinstance(inputs, str) else inputs]
        pairs = [engine.chat.prepare_text(seq[0]) if len(seq) == 1 else
                 engine.chat.prepare_text(seq[0] + seq[1], seq[0]) for seq in sequences]
        results = await score_pairs(call, pairs, body.truncate,
                                    (lambda i: f"inputs.{i}") if batch else (lambda i: "inputs"))
        out = [[Prediction(score=r.raw if body.raw_scores else sigmoid(r.raw))] for r in results]
        return out if batch else out[0]
