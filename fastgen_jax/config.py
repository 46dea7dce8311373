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


class ConfigError(ValueError):
    """A config.json (or engine option) that we cannot serve, with a message naming the field."""


ROPE_SCALING_TYPES = ("llama3", "linear", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_tanh", "gelu", "relu")
NORM_KINDS = ("rms", "layer")
POSITION_EMBEDDINGS = ("rope", "learned")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` / `rope_parameters` of config.json).

    llama3: frequency-dependent division by `factor` between `low_freq_factor` and `high_freq_factor`.
    linear: every frequency divided by `factor` (Gemma 3's global layers).
    longrope: per-frequency divisors, `short_factor` up to `original_max_position_embeddings` and
      `long_factor` beyond, and cos/sin scaled by `attention_factor` (Phi-3). The model picks one set
      once, from the engine's longest sequence, because a cached key cannot be re-rotated later.
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {self.kind!r} (supported: {ROPE_SCALING_TYPES})"
            )
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= 0:
            raise ConfigError(f"rope_scaling factors must be positive: {self}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling needs high_freq_factor > low_freq_factor: {self}")
        if self.kind == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ConfigError(f"rope_scaling short_factor and long_factor differ in length: {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only model, for every family `fastgen_jax.hf_config.ARCHITECTURES` lists.

    The fields past `eos_token_ids` switch on what a family adds to the Llama layout; their defaults
    are Llama's, so a Llama config sets none of them.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5  # the epsilon of every norm (LayerNorm's too)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # keys a token sees at most, on the layers `layer_types` says
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: all sliding
    partial_rotary_factor: float = 1.0  # share of head_dim that RoPE rotates (the leading part)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # activation of the gated MLP, one of HIDDEN_ACTS
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    post_norms: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this), not 1/sqrt(head_dim)
    attn_logit_softcap: float | None = None  # cap * tanh(score / cap) on attention scores (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the vocabulary logits (Gemma 2)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3)
    num_experts: int = 0  # mixture of experts when positive (Mixtral, Qwen2-MoE, Qwen3-MoE)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate width
    norm_topk_prob: bool = True  # renormalise the chosen experts' router weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert behind a sigmoid gate
    norm_kind: str = "rms"  # "layer": LayerNorm with a bias (Falcon, OPT)
    mlp_gated: bool = True  # False: down(act(up(x))) without a gate (Falcon, OPT)
    mlp_bias: bool = False  # biases on the MLP projections (OPT, Falcon with `bias`)
    attn_out_bias: bool = False  # a bias on the attention output projection (OPT, Falcon with `bias`)
    parallel_attn: bool = False  # attention and MLP read the same layer input, one residual (Falcon)
    parallel_norms: int = 1  # with parallel_attn: one shared norm, or 2 (attention's and the MLP's)
    position_embedding: str = "rope"  # "learned": a position table added to the embeddings (OPT)
    learned_pos_offset: int = 0  # OPT's table starts at row 2

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
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ConfigError(
                f"head_dim * partial_rotary_factor must be even for RoPE, got {self.rotary_dim}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        for name, allowed in (("norm_kind", NORM_KINDS), ("position_embedding", POSITION_EMBEDDINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ConfigError(
                    f"layer_types must list one of {LAYER_TYPES} per layer, got {self.layer_types}"
                )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must lie in "
                f"1..num_experts={self.num_experts}"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: the layer attends to every earlier key)."""
        if self.sliding_window is None:
            return (None,) * self.num_layers
        types = self.layer_types or ("sliding_attention",) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from the fields of a Hugging Face config.json (see `hf_config`)."""
        from fastgen_jax import hf_config

        return cls(**hf_config.fields_from_hf(d))

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
        from fastgen_jax import hf_config

        return hf_config.hf_from_config(self)


SCHEDULING_POLICIES = ("splitfuse", "prefill_first", "sla")
SPECULATIVE_METHODS = ("off", "ngram", "draft")
ATTENTION_IMPLS = ("auto", "reference", "pallas", "pallas_interpret", "cpu")
QUANTIZE_MODES = ("none", "int8")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


SMALL_BUCKETS_FROM_BUDGET = 256  # serving budgets also get slabs of 1 and 4 rows (see EngineConfig)


def _default_token_buckets(budget: int) -> tuple[int, ...]:
    small = (1, 4) if budget >= SMALL_BUCKETS_FROM_BUDGET else ()
    buckets = [b for b in (*small, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b < budget]
    return (*buckets, budget)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits of the batching engine. Shapes of every compiled step follow from these alone.

    token_budget: tokens in one forward pass (FastGen's `max_ragged_batch_size`, vLLM's
      `max_num_batched_tokens`); with adaptive_budget, the largest budget a step may take.
    adaptive_budget: choose each step's budget among `token_buckets` (`engine.budget`): the largest
      whose predicted step time keeps decoding sequences within their SLA's token rate. Compiles
      nothing new.
    sla_token_rate: the default SLA's rate R (a request may set its own): generated tokens/s per
      sequence that the adaptive budget and the "sla" policy protect (the EMA of each sequence's token
      gaps stays at or below 1 / R seconds).
    sla_prompt_rate: the default SLA's prompt rate P (first token within prompt_tokens / P seconds);
      the adaptive budget stops protecting the token gaps of a request that has missed it.
    token_buckets: slab sizes a step is padded up to; each is compiled once at start-up. Defaults to
      powers of two from 16 up to the budget, and from a budget of 256 (serving sizes) also 1 and 4:
      every padding row goes through the whole model, so on a CPU one decoding sequence ran a step
      of 1 row 1.7x faster than one of 16 (SmolLM2, 68 vs 118 ms); two more programs to compile.
    max_num_seqs: sequences in one forward pass (decoding plus prompt chunks).
    page_size: tokens per KV page.
    num_pages: KV pages in the pool; None means as many as `kv_cache_bytes` allows.
    kv_cache_bytes: memory for the KV pool when num_pages is None.
    max_model_len: longest sequence (prompt + generation); None means the model's limit.
    policy: "splitfuse" (Dynamic SplitFuse), "prefill_first" (whole prompts first, no splitting) or
      "sla" (SplitFuse filled by SLA slack: `engine.sla_policy`; sla_* rates are its default SLA).
    attention_impl: "auto" (the Pallas kernel on GPU, the C++ kernel on CPU when it builds, else the
      reference), "reference" (pure JAX), "pallas" (the GPU kernel), "pallas_interpret" (the kernel
      through the Pallas interpreter: any backend, slow; for tests) or "cpu" (the C++ CPU kernel,
      `cpu_kernels`; raises if it cannot be built).
    quantize: "none", or "int8": the layer stack's projections and the LM head as int8 weights with
      a float32 scale per output channel, everything else in the compute dtype (`fastgen_jax.quantize`;
      on the CPU kernels a decode step reads a quarter of float32's weight bytes). Under tensor
      parallelism each device holds the int8 rows of its own heads and columns (`fastgen_jax.parallel`)
      and XLA's dots multiply them (the C++ matmul kernels run on one device only).
    kv_cache_dtype: the KV pages' element type: "auto" (the compute dtype), "float32" or "bfloat16".
      bfloat16 pages under a float32 model hold twice the tokens in the same memory and halve the
      bytes a decode step's attention reads; keys and values are rounded once when written. The CPU
      kernel and the reference keep scores and sums in float32; the Pallas kernel also rounds the
      queries to the pages' type (llama.cpp's default KV is float16 for the same reasons).
    tensor_parallel: devices one engine's step runs on, its heads and MLP split over them (see
      `fastgen_jax.parallel`). The host side is the same for any value.
    enable_prefix_caching: share the KV of full pages, as soon as it is written and after their
      sequences end, with any prompt that starts with the same tokens (`engine.page_allocator`).
    async_scheduling: overlap the host's work with the device's: schedule and plan step N+1 while step
      N runs, and read N's tokens back while N+1 runs (`llm_engine`). Off: one step at a time.
    launch_timing: with overlap, when step N+1 is launched: "early" (as N starts; requests that
      arrive while N runs wait for N+1 too), "late" (just before N is predicted to end, with the
      requests that arrived while it ran; `engine.launch`) or "auto": late under policy "sla", whose
      composer keeps each step within the gap its decodes can take, early under FastGen's two (on
      this CPU SplitFuse launched late lost effective throughput at 4 clients and gained at 8).
      Late applies where the engine's caller hands it arrivals during a step (the server's
      `intake`); offline jobs add theirs first.
    speculative: "off", "ngram" (prompt lookup: propose what followed the sequence's last tokens earlier
      in its own prompt and output) or "draft" (a smaller model, `speculative_model`, proposes); see
      `engine.speculative`. The target verifies the proposals in the same step; output is unchanged.
    num_speculative_tokens: the most tokens proposed per sequence and step (adapted per sequence to
      its acceptance rate, and only out of budget the step would leave idle).
    speculative_logit_rows: extra logit rows each compiled step has for verification (the LM head
      runs for max_num_seqs + these rows, not for every slab row); None: 16 x num_speculative_tokens.
    speculative_model: the draft checkpoint (same tokenizer) for speculative="draft".
    ngram_min, ngram_max: n-gram lengths prompt lookup matches, longest first.
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
    quantize: str = "none"
    kv_cache_dtype: str = "auto"
    tensor_parallel: int = 1
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    launch_timing: str = "auto"
    speculative: str = "off"
    num_speculative_tokens: int = 4
    speculative_logit_rows: int | None = None
    speculative_model: str | None = None
    ngram_min: int = 2
    ngram_max: int = 4

    @property
    def launches_late(self) -> bool:
        """Whether steps are launched late under overlap (`launch_timing`, "auto" resolved)."""
        if not self.async_scheduling:
            return False
        return self.launch_timing == "late" or (self.launch_timing == "auto" and self.policy == "sla")

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
        if self.launch_timing not in ("auto", "early", "late"):
            raise ConfigError(f"launch_timing must be auto, early or late, got {self.launch_timing!r}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        self._check_speculative()
        if self.token_buckets is None:
            object.__setattr__(self, "token_buckets", _default_token_buckets(self.token_budget))
        buckets = tuple(self.token_buckets)
        if list(buckets) != sorted(set(buckets)) or buckets[-1] != self.token_budget or buckets[0] <= 0:
            raise ConfigError(
                f"token_buckets must be increasing, positive and end at token_budget="
                f"{self.token_budget}, got {buckets}"
            )
        object.__setattr__(self, "token_buckets", buckets)

    def _check_speculative(self) -> None:
        if self.speculative not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative must be one of {SPECULATIVE_METHODS}, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.speculative == "draft" and not self.speculative_model:
            raise ConfigError("speculative='draft' needs speculative_model (the draft checkpoint)")
        if self.speculative_logit_rows is not None and self.speculative_logit_rows < 1:
            raise ConfigError(f"speculative_logit_rows must be >= 1, got {self.speculative_logit_rows}")

    @property
    def verification_rows(self) -> int:
        """Logit rows each step has beyond one per sequence slot: 0 without speculation."""
        if self.speculative == "off":
            return 0
        if self.speculative_logit_rows is not None:
            return self.speculative_logit_rows
        return 16 * self.num_speculative_tokens
