"""What one fused (SplitFuse) step costs next to the steps it replaces, with the engine's own step().

    python scripts/bench_mixed_step.py --model=checkpoints/smollm2-135m-instruct

For each policy: N sequences are prefilled and decoding (context ~--context), then one prompt of
--prompt_len tokens arrives. Times decode-only steps first, then the next steps, printing what each
held (samples = sequences that got a token). Under splitfuse the first steps after the arrival mix the
N decodes with a prompt chunk; under prefill_first they hold the prompt alone.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Model directory.")
flags.DEFINE_integer("num_decoding", 8, "Sequences decoding when the prompt arrives.")
flags.DEFINE_integer("context", 512, "Prompt length of the decoding sequences.")
flags.DEFINE_integer("prompt_len", 512, "Length of the arriving prompt.")
flags.DEFINE_integer("token_budget", 256, "Token budget.")


def run(policy: str) -> None:
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.sampling_params import SamplingParams

    config = EngineConfig(
        token_budget=FLAGS.token_budget, max_num_seqs=32, max_model_len=1024, num_pages=2048, policy=policy
    )
    engine = LLMEngine.from_pretrained(FLAGS.model, config, progress=False)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    for i in range(FLAGS.num_decoding):
        engine.add_request(
            prompt_token_ids=list(range(100 + i, 100 + i + FLAGS.context)), sampling_params=params
        )
    while engine.scheduler.num_waiting or any(s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(6):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    print(
        f"{policy:>13}  decode only ({FLAGS.num_decoding} sequences): {statistics.median(times) * 1e3:.0f} ms"
    )
    engine.add_request(prompt_token_ids=list(range(2000, 2000 + FLAGS.prompt_len)), sampling_params=params)
    for _ in range(4):
        tokens = engine.scheduler.num_waiting, len(engine.scheduler.running)
        start = time.perf_counter()
        samples = len(engine.step())
        print(f"{policy:>13}  next step: {(time.perf_counter() - start) * 1e3:.0f} ms, {samples} samples "
              f"(waiting/running before: {tokens[0]}/{tokens[1]})")  # fmt: skip


def main(argv):
    del argv
    for policy in ("splitfuse", "prefill_first"):
        run(policy)


if __name__ == "__main__":
    app.run(main)
