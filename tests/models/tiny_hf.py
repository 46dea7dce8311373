"""Test helper: tiny random-weight transformers models saved as safetensors, our conversion of them,
and their logits, shared by every parity test."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from fastgen_jax.checkpoints import load_hf_dir

DROP = object()  # a common field that this family's config class does not take


def save_tiny_hf_model(config_cls, fields: dict, path) -> transformers.PreTrainedModel:
    """A random-weight eager float32 transformers model of `config_cls(**fields)`, saved to `path`.
    Norms and biases get noise too, so a misplaced one cannot hide, and routers are scaled up so
    expert choices have clear winners and no near-ties."""
    torch.manual_seed(0)
    hf_config = config_cls(**{k: v for k, v in fields.items() if v is not DROP})
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for pname, p in hf_model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if "gate" in pname and "proj" not in pname:
                p.mul_(10.0)
    hf_model.save_pretrained(path, safe_serialization=True)
    return hf_model


def make_tiny_model(tiny_models: dict, common: dict, name: str, path, **overrides):
    """(name, transformers model, our config, our params) for the entry `name` of `tiny_models`
    ({name: (config class, fields over `common`)})."""
    config_cls, extra = tiny_models[name]
    hf_model = save_tiny_hf_model(config_cls, {**common, **extra, **overrides}, path)
    config, params = load_hf_dir(path)
    return name, hf_model, config, params


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    """f32[len(ids), vocab]: transformers' logits for one sequence."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def chunked_prefill_diff(hf_model, config, params) -> float:
    """max |ours - transformers| over 37 tokens fed in chunks that start and end mid-page, a
    one-token chunk and a padded slab."""
    from tests.paged import paged_logits

    ids = np.random.default_rng(7).integers(3, config.vocab_size, 37).tolist()
    chunked = paged_logits(config, params, ids, chunks=[5, 11, 1, 13, 7], page_size=8, slab=16)
    return float(np.abs(chunked - hf_logits(hf_model, ids)).max())
