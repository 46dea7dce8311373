"""What a draft model costs: SmolLM2 as the target, a draft model proposing (`--speculative=draft`).

By default the draft is a tiny random Llama (`--draft_layers` layers of `--draft_hidden`, the
target's tokenizer and vocabulary, saved to a temporary directory): its proposals are almost never
accepted, so this measures the plumbing and the draft's own cost, not a speed-up. `--draft=self`
uses the target as its own draft instead: its greedy proposals are the target's own argmax, so
nearly all are accepted (a check of the mirroring on a real model, not a useful configuration:
the draft then costs as much as the target).

For each concurrency in `--concurrency` it runs that many chat prompts at once, greedy, exactly
`--max_new_tokens` each, once without speculation and once with the draft, on engines warmed up
before the clock starts, and reports: generated tokens/s, whether the outputs are identical, the
draft's acceptance, and the draft's cost (`DraftProposer.stats`): wall time per `propose` call (one
call per target step that speculates), per draft forward pass, draft passes per call, and the share
of the run spent in the draft. Also the start-up cost: the draft's compiled programs and compile
seconds. Timings on a shared CPU are noisy: the load average is recorded beside them.

    python scripts/bench_draft.py                          # tiny random draft, 1 and 4 concurrent
    python scripts/bench_draft.py --force_k                # the draft proposes every step
    python scripts/bench_draft.py --draft=self --concurrency=1
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "The target checkpoint.")
_DRAFT = flags.DEFINE_string("draft", "tiny", "'tiny' (random, made here), 'self', or a checkpoint path.")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 2, "Layers of the tiny random draft.")
_DRAFT_HIDDEN = flags.DEFINE_integer("draft_hidden", 64, "Hidden size of the tiny random draft.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4"], "Concurrent requests per run.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Generated tokens per request (EOS ignored).")
_K = flags.DEFINE_integer("num_speculative_tokens", 4, "Most draft tokens per sequence and step.")
_BUDGET = flags.DEFINE_integer("token_budget", 256, "Token budget of target and draft.")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", 1024, "Longest sequence.")
_FORCE_K = flags.DEFINE_bool(
    "force_k",
    False,
    "Propose num_speculative_tokens every step whatever the acceptance (adaptive k off: with a random "
    "draft it would switch speculation off after a step or two), to measure the draft's cost.",
)
_OUT = flags.DEFINE_string("out", None, "JSON path (default: docs/benchmarks/draft_<draft>_cpu.json).")

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List five tips for keeping a small vegetable garden healthy.",
    "What are the main differences between a comet and an asteroid?",
    "Describe a walk through a busy market in the morning.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Answer in a few sentences.",
    "Summarise the plot of a heist film you would like to see.",
]


def tiny_draft(model: str, directory: str) -> str:
    """A random Llama with the target's vocabulary and tokenizer, saved as a Hugging Face dir."""
    import torch
    import transformers

    from fastgen_jax.checkpoints import load_checkpoint

    target = load_checkpoint(model)
    torch.manual_seed(0)
    hidden = _DRAFT_HIDDEN.value
    config = transformers.LlamaConfig(
        vocab_size=target.config.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=_DRAFT_LAYERS.value,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=_MAX_MODEL_LEN.value,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    target.tokenizer.save(directory)
    return directory


def run(engine, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], float]:
    from fastgen_jax.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    ids = [engine.add_request(chat, params) for chat in chats]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids], time.perf_counter() - start


def engine_for(draft: str | None):
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.engine import speculative
    from fastgen_jax.llm_engine import LLMEngine

    if _FORCE_K.value:
        speculative.MIN_WORTH = 0.0  # read when the Speculator is built: every k is worth it

    spec = {} if draft is None else dict(speculative="draft", speculative_model=draft)
    config = EngineConfig(
        token_budget=_BUDGET.value,
        max_num_seqs=32,
        max_model_len=_MAX_MODEL_LEN.value,
        num_speculative_tokens=_K.value,
        **spec,
    )
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(_MODEL.value, config, progress=False)
    seconds = time.perf_counter() - start
    run(engine, PROMPTS[:1], 8)  # first executions out of the timed runs
    return engine, seconds


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        draft = {"tiny": None, "self": _MODEL.value}.get(_DRAFT.value, _DRAFT.value)
        draft = draft or tiny_draft(_MODEL.value, tmp)
        plain, plain_start = engine_for(None)
        drafted, draft_start = engine_for(draft)
        proposer = drafted.speculator.proposer
        result = {
            "model": _MODEL.value,
            "draft": _DRAFT.value,
            "draft_layers": _DRAFT_LAYERS.value if _DRAFT.value == "tiny" else None,
            "draft_hidden": _DRAFT_HIDDEN.value if _DRAFT.value == "tiny" else None,
            "num_speculative_tokens": _K.value,
            "force_k": _FORCE_K.value,
            "token_budget": _BUDGET.value,
            "max_new_tokens": _MAX_NEW.value,
            "start_seconds": {"plain": round(plain_start, 2), "with_draft": round(draft_start, 2)},
            "draft_programs": proposer.stats.compiled_programs,
            "draft_compile_seconds": round(proposer.runner.compile_seconds, 2),
            "runs": [],
        }
        for concurrency in map(int, _CONCURRENCY.value):
            prompts = (PROMPTS * concurrency)[:concurrency]
            before = os.getloadavg()[0]
            want, plain_seconds = run(plain, prompts, _MAX_NEW.value)
            s0 = {**vars(proposer.stats)}
            e0 = drafted.stats.spec_proposed_tokens, drafted.stats.spec_accepted_tokens
            got, draft_seconds = run(drafted, prompts, _MAX_NEW.value)
            s = {k: v - s0[k] for k, v in vars(proposer.stats).items()}
            proposed = drafted.stats.spec_proposed_tokens - e0[0]
            accepted = drafted.stats.spec_accepted_tokens - e0[1]
            generated = sum(map(len, want))
            row = {
                "concurrency": concurrency,
                "identical": got == want,
                "plain_tok_s": round(generated / plain_seconds, 1),
                "draft_tok_s": round(generated / draft_seconds, 1),
                "proposed": proposed,
                "accepted": accepted,
                "acceptance": round(accepted / proposed, 3) if proposed else None,
                "propose_calls": s["proposals"],
                "draft_steps": s["steps"],
                "draft_steps_per_call": round(s["steps"] / s["proposals"], 2) if s["proposals"] else None,
                "ms_per_call": round(1e3 * s["seconds"] / s["proposals"], 2) if s["proposals"] else None,
                "ms_per_draft_step": round(1e3 * s["seconds"] / s["steps"], 2) if s["steps"] else None,
                "draft_share_of_run": round(s["seconds"] / draft_seconds, 3),
                "load_before": round(before, 2),
                "load_after": round(os.getloadavg()[0], 2),
            }
            result["runs"].append(row)
            print(json.dumps(row))
    forced = "_forced" if _FORCE_K.value else ""
    out = pathlib.Path(_OUT.value or f"docs/benchmarks/draft_{_DRAFT.value}{forced}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
