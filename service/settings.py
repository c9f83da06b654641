"""The one typed settings object of the service.

Filled from `REWARDSERVE_*` environment variables (what the Helm chart and Dockerfile set) and from
`rewardserve serve --flags` (service/server.py passes given flags as init arguments, which
pydantic-settings ranks above the environment). Field names are a contract with the chart: keep them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _int_from_text(value):
    # Environment variables are text; Literal[503, 429] only matches ints.
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REWARDSERVE_", extra="ignore")

    bundle: Path | None = Field(None, description="model bundle directory (manifest.json, model, tokenizer.json), "
                                "served as one model; give this or repository")
    repository: Path | None = Field(None, description="model repository directory: DIR/<model>/<version>/ bundles "
                                    "(the highest integer version served), DIR/<name>/ensemble.json ensembles, "
                                    "DIR/<model>/config.json traffic/shadow (docs/deploy.md); give this or bundle")
    default_model: str | None = Field(None, description="the model a request without `model` is scored on "
                                      "(repository only; unset: the only model of the repository)")
    repository_poll_s: float = Field(0.0, ge=0, description="rescan the repository every this many seconds and "
                                     "load new versions (hot swap); 0: only on POST /admin/reload")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = all cores")
    ort_spinning: bool = False
    fp16: bool | None = Field(None, description="run an fp32 bundle in fp16 (converted at load, checked "
                              "against the bundle's recorded scores before serving); unset: on with CUDA only")
    ort_io_binding: bool | None = Field(None, description="ONNX Runtime IO binding; unset: on with CUDA only")
    max_batch_size: int = Field(64, ge=1, description="items per model run")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per model run (longest × items)")
    efficient_batch_tokens: int | None = Field(None, ge=0, description="padded tokens per run beyond which the "
                                               "runtime gets slower per item; unset: the runtime's batch hint "
                                               "(CPU 512, CUDA none); 0: no limit beyond max_batch_tokens")
    min_padding_efficiency: float | None = Field(None, ge=0, le=1, description="real/padded tokens a joint run "
                                                 "must keep; unset: the runtime's batch hint (CPU 0.9, CUDA 0)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a non-full batch lingers for items that were "
                                                       "already admitted and are still being tokenized")
    max_queue: int = Field(65536, ge=1, description="items admitted and not yet computed; beyond → overload. "
                           "A count limit for interactive deployments; batch clients are admitted by tokens and "
                           "deadline (max_queue_tokens, request_timeout_s)")
    max_queue_tokens: int = Field(4_000_000, ge=1, description="real tokens queued and not yet computed (bounds "
                                  "queue memory); beyond → overload, a request over it alone → 413")
    max_client_batch: int = Field(256, ge=1, description="items per /v1/score/batch, responses per /v1/rank")
    max_body_bytes: int = Field(2_000_000, ge=1)
    max_compat_body_bytes: int = Field(64_000_000, ge=1, description="body limit of the ecosystem routes "
                                       "(/get_reward, /classify, /pooling, /v1/embeddings, /predict, /rerank, /, "
                                       "/invocations): RLHF clients post whole rollout batches (OpenRLHF: 64 long "
                                       "queries are ~7 MB); max_body_bytes is the /v1 routes' limit")
    request_timeout_s: float = Field(180.0, gt=0, description="server maximum deadline of one request; a request "
                                     "is admitted only while the work queued ahead of it can finish within its "
                                     "deadline (this, or X-Request-Timeout if shorter). 180 s: OpenRLHF's client "
                                     "timeout, so a rollout burst waits instead of being refused")
    overload_status: Annotated[Literal[503, 429], BeforeValidator(_int_from_text)] = 503
    retry_after_s: int = Field(1, ge=0)
    drain_timeout_s: float = Field(20.0, ge=0, description="graceful shutdown: time to answer queued work")
    log_level: Annotated[Literal["critical", "error", "warning", "info", "debug", "trace"],
                         BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"
    tokenizer_threads: int = Field(2, ge=1)
    cache_size: int = Field(100_000, ge=0, description="score cache entries (LRU keyed by model and token ids); "
                            "0 disables it. Identical items in one request are scored once either way")
    prompt_reuse_min_tokens: int = Field(64, ge=0, description="best-of-N (/v1/rank, /v1/compare) on a causal "
                                         "decoder: when the candidates share at least this many leading tokens "
                                         "(the prompt), the prompt runs once and each candidate on its cached "
                                         "keys/values (docs/decoders.md); 0 turns it off. Also the minimum for "
                                         "prefix sharing across requests: queued items of any route that start "
                                         "with this many equal token ids are grouped and their shared run "
                                         "computed once")
    prefix_cache_tokens: int = Field(32768, ge=0, description="prefix cache budget in tokens (causal decoders "
                                     "with prompt reuse on): keys/values of recently computed prompts kept "
                                     "across batches, so a GRPO group's later samples skip their prompt. Memory: "
                                     "tokens × 2·layers·kv_heads·head_dim·dtype bytes (a 0.5 B Qwen2 on CPU: "
                                     "24 KiB a token, 0.8 GB at the default); on a GPU it is taken from the "
                                     "memory the batch token budget is sized from. 0: no cache across batches")
    api_keys_file: Path | None = Field(None, description="file of bearer keys, one 'KEY [SCOPE ...]' per line (# "
                                       "comments); every /v1/* route and the compatibility routes (/get_reward, "
                                       "/classify, /pooling, /v1/embeddings, /predict, /rerank, /, /invocations) "
                                       "then need 'Authorization: Bearer <key>'. Unset, and no "
                                       "REWARDSERVE_API_KEYS: no authentication")
    api_keys: SecretStr | None = Field(None, description="bearer keys, comma-separated, each 'KEY [SCOPE ...]' "
                                       "like a line of api_keys_file; added to the file's keys. Environment "
                                       "only (a flag would show the keys in ps)")
    metrics_auth: bool = Field(False, description="/metrics also needs a bearer key (scope metrics) when keys "
                                                  "are configured; default: open for the scraper")
    client_label_header: str | None = Field(None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
                                            description="request header (e.g. X-Client) whose value labels the "
                                            "drift metrics by client (docs/monitoring.md); unset: one 'none' "
                                            "label")
    client_label_max: int = Field(20, ge=1, le=1000, description="distinct client label values kept; later "
                                  "ones are counted as 'other' (bounds the metrics' cardinality)")
    special_tokens_in_content: Literal["text", "refuse"] = Field("text", description="a control token's text "
                                                                 "(e.g. <|im_end|>, the EOS) inside content "
                                                                 "(`messages`, /v1 prompt/response): text = read as "
                                                                 "its plain characters and flagged "
                                                                 "special_token_in_content; refuse = 422 naming the "
                                                                 "field (docs/decoders.md)")

    @model_validator(mode="after")
    def _one_source(self) -> "Settings":
        # Exactly one place to load models from: a bundle (one model) or a repository (several).
        if (self.bundle is None) == (self.repository is None):
            raise ValueError("give exactly one of bundle (one model) or repository (a model repository directory)"
                             if self.bundle is None else "give bundle or repository, not both")
        if self.default_model is not None and self.repository is None:
            raise ValueError("default_model applies to a repository (a bundle serves one model)")
        return self
