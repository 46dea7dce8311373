"""SmolLM2-135M-Instruct converted by our code against transformers loading the same GGUF file."""

import numpy as np
import pytest
import torch

from fastgen_jax.checkpoints import load_checkpoint, load_gguf
from tests.paged import greedy_continuation, paged_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "日本の首都は",
    "Translate to French: I love programming.",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_next_token_logits_match_transformers(smollm2_gguf, hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    config, params, _ = load_gguf(smollm2_gguf)
    worst = 0.0
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        ours = paged_logits(config, params, ids, page_size=16)[-1]
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
        assert ours.argmax() == theirs.argmax()
    print(f"SmolLM2 next-token logits: max|diff| over {len(PROMPTS)} prompts = {worst:.2e}")
    assert worst < 1e-3


# 10 s a prompt: two by default, the other two with -m slow (CI time)
@pytest.mark.parametrize(
    "prompt", [*PROMPTS[:2], *(pytest.param(p, marks=pytest.mark.slow) for p in PROMPTS[2:4])]
)
def test_greedy_continuations_match_transformers(smollm2_dir, hf_smollm2, prompt):
    hf_model, hf_tokenizer = hf_smollm2
    checkpoint = load_checkpoint(smollm2_dir)  # the converted (orbax) form
    ids = hf_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)[
            0, len(ids) :
        ].tolist()
    ours = greedy_continuation(checkpoint.config, checkpoint.params, ids, 32)
    # transformers stops at EOS (id 2); up to there the two must agree token for token.
    assert ours[: len(hf_out)] == hf_out, prompt
    assert len(hf_out) == 32 or hf_out[-1] == 2
