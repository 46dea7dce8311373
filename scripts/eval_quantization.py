"""What weight-only int8 (`--quantize=int8`) and bfloat16 KV pages (`--kv_cache_dtype=bfloat16`) cost
in accuracy against float32, on real text.

    python scripts/eval_quantization.py [--model=checkpoints/smollm2-135m-instruct] \
        [--text_files=README.md,/usr/share/common-licenses/GPL-3] [--window=512] [--windows=8]

Each text file is tokenized and cut into windows of `--window` tokens (at most `--windows` in all,
spread over the files). Both models see every window as one prompt through the paged cache (teacher
forcing) and give the next-token distribution at every position. The variants: float32 (weights and
KV pages: the reference), int8 weights, bfloat16 KV pages, and both. Reported, over all positions:
perplexity of each variant on the text, and against float32 how often their top tokens agree, the
mean KL divergence KL(float32 || variant) in nats, and the largest log-probability difference. Prints
a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fastgen_jax import parallel, quantize  # noqa: E402
from fastgen_jax.attention import get_attention  # noqa: E402
from fastgen_jax.checkpoints import load_checkpoint  # noqa: E402
from fastgen_jax.models import AttentionMetadata, build_model, init_kv_cache  # noqa: E402

flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint directory or .gguf.")
flags.DEFINE_list(
    "text_files", ["README.md", "/usr/share/common-licenses/GPL-3"], "Texts to score (missing ones skipped)."
)
flags.DEFINE_integer("window", 512, "Tokens per scored window.")
flags.DEFINE_integer("windows", 8, "Windows in all.")
flags.DEFINE_string("output_json", "docs/benchmarks/int8_accuracy.json", "Where to write the figures.")
FLAGS = flags.FLAGS
PAGE_SIZE = 16


def windows_of(tokenizer, files: list[str], window: int, count: int) -> list[list[int]]:
    texts = [pathlib.Path(f).read_text(errors="replace") for f in files if os.path.exists(f)]
    if not texts:
        sys.exit(f"error: none of --text_files={','.join(files)} exists")
    per_file = -(-count // len(texts))
    out = []
    for text in texts:
        ids = tokenizer.encode(text)
        out += [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)][:per_file]
    return out[:count]


def metadata(n: int) -> AttentionMetadata:
    """One sequence of n tokens from position 0, logits for every row."""
    pages = np.arange(1, n // PAGE_SIZE + 2, dtype=np.int32)
    pos = np.arange(n, dtype=np.int32)
    return AttentionMetadata(
        positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE),
        kv_lens=jnp.asarray([n], jnp.int32),
        page_indices=jnp.asarray(pages[None]),
        cu_q_lens=jnp.asarray([0, n], jnp.int32),
        num_seqs=jnp.asarray([1], jnp.int32),
        logits_indices=jnp.asarray(pos),
    )


def main(argv):
    del argv
    checkpoint = load_checkpoint(FLAGS.model)
    config = checkpoint.config
    fused = parallel.fuse_projections(jax.device_put(checkpoint.params), 1)
    int8 = quantize.quantize_params(fused, config.tie_word_embeddings)
    variants = {  # name: (weights, KV pages' dtype)
        "float32": (fused, jnp.float32),
        "int8": (int8, jnp.float32),
        "bf16 KV": (fused, jnp.bfloat16),
        "int8, bf16 KV": (int8, jnp.bfloat16),
    }
    model = build_model(config, jnp.float32, get_attention("auto"), FLAGS.window + PAGE_SIZE)
    step = jax.jit(model.apply)
    chunks = windows_of(checkpoint.tokenizer, FLAGS.text_files, FLAGS.window, FLAGS.windows)
    md = metadata(FLAGS.window)
    num_pages = FLAGS.window // PAGE_SIZE + 2
    nll = {k: [] for k in variants}
    others = [k for k in variants if k != "float32"]
    agree, kl, max_diff = ({k: [] for k in others}, {k: [] for k in others}, dict.fromkeys(others, 0.0))
    for ids in tqdm(chunks, desc="windows"):
        logp = {}
        for name, (variables, kv_dtype) in variants.items():
            kv = init_kv_cache(config, num_pages, PAGE_SIZE, kv_dtype)
            logits, _ = step(variables, jnp.asarray(ids, jnp.int32), kv, md)
            logits = np.asarray(logits, np.float64)
            logp[name] = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            nll[name] += (-logp[name][np.arange(len(ids) - 1), ids[1:]]).tolist()
        f = logp["float32"]
        for name in others:
            q = logp[name]
            agree[name] += (f.argmax(-1) == q.argmax(-1)).tolist()
            kl[name] += (np.exp(f) * (f - q)).sum(-1).tolist()
            max_diff[name] = max(max_diff[name], float(np.abs(f - q).max()))
    report = {
        "model": FLAGS.model,
        "text_files": [f for f in FLAGS.text_files if os.path.exists(f)],
        "windows": len(chunks),
        "window": FLAGS.window,
        "positions": len(agree["int8"]),
        "perplexity": {k: float(np.exp(np.mean(v))) for k, v in nll.items()},
        "top1_agreement": {k: float(np.mean(v)) for k, v in agree.items()},
        "mean_kl_nats": {k: float(np.mean(v)) for k, v in kl.items()},
        "max_logprob_diff": max_diff,
    }
    print(f"{len(chunks)} windows x {FLAGS.window} tokens of {', '.join(report['text_files'])}")
    header = ("variant", "perplexity", "top-1 agree", "mean KL", "max diff")
    print(f"{header[0]:<16}" + "".join(f"{h:>13}" for h in header[1:]) + "   (against float32)")
    for name in variants:
        row = f"{name:<16}{report['perplexity'][name]:>13.3f}"
        if name != "float32":
            row += f"{report['top1_agreement'][name]:>13.4f}"
            row += f"{report['mean_kl_nats'][name]:>13.5f}{max_diff[name]:>13.3f}"
        print(row)
    if FLAGS.output_json:
        pathlib.Path(FLAGS.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
