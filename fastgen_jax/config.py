"""Frozen configuration: the model's shape (from a Hugging Face `config.json`) and the engine's limits.

Nothing here imports jax, so the host-side engine can use these classes freely. Values that are only
known at run time (how many KV pages fit in memory, for example) do not belong here: they live in a
separate resolved object built by the runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# `architectures` entries and `model_type` values of config.json that the Llama-family
# implementation serves. Kept here (not in models/) so host code can validate a config without jax.
LLAMA_FAMILY_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)
LLAMA_FAMILY_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
    """A config.json (or engine option) that we cannot serve, with a message naming the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= 0:
            raise ConfigError(f"rope_scaling factors must be positive: {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling needs high_freq_factor > low_freq_factor: {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous keys
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from the fields of a Hugging Face config.json."""
        architecture = _architecture_of(d)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = d.get("sliding_window")
            if d.get("use_sliding_window") is False:  # Qwen2 lists a window it does not use
                window = None
            return cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(_rope_field(d, "rope_theta", 10000.0)),
                rope_scaling=_rope_scaling_of(d),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", architecture == "Qwen2ForCausalLM")),
                sliding_window=int(window) if window else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of `from_hf_dict`: a config.json that transformers can also read."""
        model_type = {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}.get(
            self.architecture, "llama"
        )
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        return d


def _architecture_of(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in LLAMA_FAMILY_ARCHITECTURES:
            return arch
    model_type = d.get("model_type")
    if not archs and model_type in LLAMA_FAMILY_MODEL_TYPES:
        return LLAMA_FAMILY_ARCHITECTURES[LLAMA_FAMILY_MODEL_TYPES.index(model_type)]
    raise ConfigError(
        f"unsupported architecture {archs or model_type!r}: fastgen-jax serves "
        f"{', '.join(LLAMA_FAMILY_ARCHITECTURES)}"
    )


def _rope_field(d: dict[str, Any], name: str, default: Any) -> Any:
    # transformers 5 moved rope settings into `rope_parameters`; older files keep them top level.
    params = d.get("rope_parameters") or {}
    return d.get(name, params.get(name, default)) or default


def _rope_scaling_of(d: dict[str, Any]) -> RopeScaling | None:
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


SCHEDULING_POLICIES = ("splitfuse", "prefill_first")
ATTENTION_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")


def _default_token_buckets(budget: int) -> tuple[int, ...]:
    buckets = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b < budget]
    return (*buckets, budget)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits of the batching engine. Shapes of every compiled step follow from these alone.

    token_budget: tokens in one forward pass (FastGen's `max_ragged_batch_size`, vLLM's
      `max_num_batched_tokens`); with adaptive_budget, the largest budget a step may take.
    adaptive_budget: choose each step's budget among `token_buckets` (`engine.budget`): the largest
      whose predicted step time keeps decoding sequences within `sla_token_rate`. Compiles nothing new.
    sla_token_rate: generated tokens/s per sequence the adaptive budget protects (the SLA's rate R:
      the EMA of each sequence's token gaps stays at or below 1 / R seconds).
    sla_prompt_rate: the SLA's prompt rate P (first token within prompt_tokens / P seconds); the
      adaptive budget stops protecting the token gaps of a request that has missed it.
    token_buckets: slab sizes a step is padded up to; each is compiled once at start-up. Defaults to
      powers of two from 16 up to the budget.
    max_num_seqs: sequences in one forward pass (decoding plus prompt chunks).
    page_size: tokens per KV page.
    num_pages: KV pages in the pool; None means as many as `kv_cache_bytes` allows.
    kv_cache_bytes: memory for the KV pool when num_pages is None.
    max_model_len: longest sequence (prompt + generation); None means the model's limit.
    policy: "splitfuse" (Dynamic SplitFuse) or "prefill_first" (whole prompts first, no splitting).
    attention_impl: "auto" (the Pallas kernel on GPU, the reference elsewhere), "reference" (pure
      JAX), "pallas" (the GPU kernel) or "pallas_interpret" (the kernel through the Pallas
      interpreter: any backend, slow; for tests).
    tensor_parallel: devices one engine's step runs on, its heads and MLP split over them (see
      `fastgen_jax.parallel`). The host side is the same for any value.
    enable_prefix_caching: share the KV of full pages, as soon as it is written and after their
      sequences end, with any prompt that starts with the same tokens (`engine.page_allocator`).
    """

    token_budget: int = 512
    adaptive_budget: bool = False
    sla_token_rate: float = 4.0
    sla_prompt_rate: float = 512.0
    token_buckets: tuple[int, ...] | None = None
    max_num_seqs: int = 256
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_bytes: int = 2 << 30
    max_model_len: int | None = None
    policy: str = "splitfuse"
    attention_impl: str = "auto"
    tensor_parallel: int = 1
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.token_budget <= 0:
            raise ConfigError(f"token_budget must be positive, got {self.token_budget}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.tensor_parallel <= 0:
            raise ConfigError(f"tensor_parallel must be positive, got {self.tensor_parallel}")
        if self.sla_token_rate <= 0 or self.sla_prompt_rate <= 0:
            raise ConfigError(
                f"sla_token_rate and sla_prompt_rate must be positive, got {self.sla_token_rate}, "
                f"{self.sla_prompt_rate}"
            )
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 1:
            raise ConfigError(f"num_pages must be at least 2, got {self.num_pages}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.token_buckets is None:
            object.__setattr__(self, "token_buckets", _default_token_buckets(self.token_budget))
        buckets = tuple(self.token_buckets)
        if list(buckets) != sorted(set(buckets)) or buckets[-1] != self.token_budget or buckets[0] <= 0:
            raise ConfigError(
                f"token_buckets must be increasing, positive and end at token_budget="
                f"{self.token_budget}, got {buckets}"
            )
        object.__setattr__(self, "token_buckets", buckets)
