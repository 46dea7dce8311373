"""Speculative decoding on this machine: generated tokens/s with `--speculative=ngram` (or a draft
model) against the same engine without speculation, at 1, 4 and 16 concurrent requests, on repetitive
tasks (repeat a given text, summarise it, edit a given code file) and on open-ended chat.

Each (task, concurrency) runs both engines back to back (`--repeats` times each, the best counts) on
the same requests (greedy, chat template,
`max_tokens` each, EOS ends a request), checks that the outputs are identical, and reports
tokens/s, the speed-up, draft tokens proposed and accepted, and the mean accepted length. Prints a
table, writes JSON and a plot:

    python scripts/bench_speculative.py --output_json=docs/benchmarks/speculative_cpu.json
    python scripts/bench_speculative.py --speculative=draft --speculative_model=PATH --tasks=repeat

Targets (issue 18): at least 1.8x at 1 concurrent request on the repetitive tasks; no more than 5%
slower on open-ended chat (adaptive k must switch speculation off by itself).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Target checkpoint.")
flags.DEFINE_enum("speculative", "ngram", ["ngram", "draft"], "Proposer to compare with no speculation.")
flags.DEFINE_string("speculative_model", None, "Draft checkpoint for --speculative=draft.")
flags.DEFINE_integer("num_speculative_tokens", 4, "Most draft tokens per sequence and step.")
flags.DEFINE_list("tasks", ["repeat", "summarise", "code_edit", "chat"], "Workloads to run.")
flags.DEFINE_list("concurrency", ["1", "4", "16"], "Concurrent requests per run.")
flags.DEFINE_integer("max_tokens", 96, "Most tokens generated per request.")
flags.DEFINE_integer("token_budget", 512, "Token budget of both engines.")
flags.DEFINE_integer("repeats", 2, "Runs of each engine per point, alternating; the best tokens/s counts.")
flags.DEFINE_string("output_json", "", "Where to write the results (and a .png beside it).")
_OWN_FLAGS = ("speculative", "speculative_model", "num_speculative_tokens", "tasks", "concurrency", "repeats")

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens until it shone, and wound the clockwork that turned the beam across the "
    "water. Ships he would never meet counted on that light to find the harbour mouth between the "
    "rocks. In forty years he had missed only one night, when a storm tore the door from its hinges "
    "and he spent the hours holding it shut with his back.",
    "Bread needs only four things: flour, water, salt and yeast. Mix them into a rough dough, let it "
    "rest for twenty minutes, then knead it until it is smooth and springs back when pressed. Leave it "
    "covered in a warm place until it has doubled in size. Shape it into a loaf, let it rise once more, "
    "and bake it in a hot oven until the crust is deep brown and the bottom sounds hollow when tapped.",
    "A rainbow appears when sunlight enters raindrops, bends, reflects off the back of each drop and "
    "bends again on the way out. Because each colour bends by a slightly different amount, the white "
    "light spreads into a band of red, orange, yellow, green, blue and violet. The sun must be behind "
    "the observer and the rain in front, which is why rainbows are most common in the late afternoon "
    "after a summer shower.",
    "The village market opens at six on Saturday mornings. Farmers arrive with crates of apples, "
    "potatoes and leeks; the baker sets out rows of loaves; the cheese seller cuts samples for anyone "
    "who stops. By nine the square is crowded with families, and by noon most stalls have sold out. "
    "The stallholders pack their vans, sweep the cobbles and meet at the cafe on the corner for lunch.",
]

CODE = '''def check_int(params, name, low, high=2**31 - 1):
    """An integer in [low, high]; the default high keeps it an int32 on the device."""
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def check_number(params, name, low, high, low_inclusive=True):
    value = getattr(params, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (value == low and not low_inclusive):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
'''

CODE_EDITS = [
    "Rename the argument `params` to `settings` everywhere in this code and output the whole code.",
    "Rename `check_int` to `check_integer` in this code and output the whole code.",
    "Add a comment line `# validation helpers` at the top of this code and output the whole code.",
    "Replace every `ValueError` with `TypeError` in this code and output the whole code.",
]

CHAT = [
    "Write a short story about a dragon who is afraid of heights.",
    "What are three good reasons to learn a second language?",
    "Describe your ideal weekend in a few sentences.",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "Why do cats purr? Explain simply.",
    "Write a poem about the ocean at night.",
    "What should I pack for a week of hiking in the mountains?",
    "Explain how a bicycle stays upright when it moves.",
]


def prompts_for(task: str) -> list[str]:
    if task == "repeat":
        return [f"Repeat the following text exactly, word for word:\n\n{p}" for p in PASSAGES]
    if task == "summarise":
        return [f"Summarise the following text, quoting its key sentences:\n\n{p}" for p in PASSAGES]
    if task == "code_edit":
        return [f"{edit}\n\n```python\n{CODE}```" for edit in CODE_EDITS]
    if task == "chat":
        return list(CHAT)
    raise app.UsageError(f"unknown task {task!r}")


def make_engine(speculative: str):
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine

    config = EngineConfig(
        token_budget=FLAGS.token_budget,
        max_num_seqs=64,
        max_model_len=2048,
        speculative=speculative,
        speculative_model=FLAGS.speculative_model if speculative == "draft" else None,
        num_speculative_tokens=FLAGS.num_speculative_tokens,
    )
    return LLMEngine.from_pretrained(FLAGS.model, config, progress=False)


def run(engine, prompts: list[str]) -> dict:
    """Runs the prompts at once to the end; returns tokens/s and what speculation did."""
    from fastgen_jax.sampling_params import SamplingParams

    before = {k: getattr(engine.stats, k) for k in ("steps", "spec_proposed_tokens", "spec_accepted_tokens")}
    verifications = engine.stats.spec_verifications
    params = SamplingParams(max_new_tokens=FLAGS.max_tokens, temperature=0.0)
    start = time.perf_counter()
    chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [engine.add_request(text, params) for text in chats]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    seconds = time.perf_counter() - start
    generated = sum(map(len, tokens.values()))
    stats = engine.stats
    proposed = stats.spec_proposed_tokens - before["spec_proposed_tokens"]
    accepted = stats.spec_accepted_tokens - before["spec_accepted_tokens"]
    verified = stats.spec_verifications - verifications
    return {
        "tokens": [tokens[i] for i in ids],
        "generated": generated,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 2),
        "steps": stats.steps - before["steps"],
        "proposed": proposed,
        "accepted": accepted,
        "mean_accepted_length": round(accepted / verified, 3) if verified else 0.0,
    }


def best_of(engine, prompts: list[str]) -> dict:
    """The fastest of --repeats runs (a cold prefix cache each time): this machine's load moves single
    runs by 10-20%."""
    runs = []
    for _ in range(FLAGS.repeats):
        engine.reset_prefix_cache()
        runs.append(run(engine, prompts))
    return max(runs, key=lambda r: r["tokens_per_s"])


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        ax.plot([r["concurrency"] for r in mine], [r["speedup"] for r in mine], marker="o", label=task)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.8, color="green", lw=0.8, ls="--", label="target at 1 (repetitive)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(f"tokens/s, {FLAGS.speculative} / off")
    ax.set_title("Speculative decoding, SmolLM2-135M on this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    from tqdm.auto import tqdm

    off, on = make_engine("off"), make_engine(FLAGS.speculative)
    runs = [(t, int(c)) for t in FLAGS.tasks for c in FLAGS.concurrency]
    rows = []
    for task, concurrency in tqdm(runs, desc="runs", unit="run"):
        pool = prompts_for(task)
        prompts = [pool[i % len(pool)] for i in range(concurrency)]
        plain, spec = best_of(off, prompts), best_of(on, prompts)
        rows.append(
            {
                "task": task,
                "concurrency": concurrency,
                "off_tokens_per_s": plain["tokens_per_s"],
                "spec_tokens_per_s": spec["tokens_per_s"],
                "speedup": round(spec["tokens_per_s"] / plain["tokens_per_s"], 3),
                "same_output": plain["tokens"] == spec["tokens"],
                "generated": spec["generated"],
                "off_steps": plain["steps"],
                "spec_steps": spec["steps"],
                "proposed": spec["proposed"],
                "accepted": spec["accepted"],
                "acceptance": round(spec["accepted"] / spec["proposed"], 3) if spec["proposed"] else 0.0,
                "mean_accepted_length": spec["mean_accepted_length"],
            }
        )
    header = f"{'task':<10} {'conc':>4} {'off tok/s':>9} {'spec tok/s':>10} {'speedup':>7} {'same':>5} "
    header += f"{'steps':>11} {'accept':>6} {'mean acc':>8}"
    print(header)
    for r in rows:
        steps = f"{r['off_steps']}->{r['spec_steps']}"
        print(
            f"{r['task']:<10} {r['concurrency']:>4} {r['off_tokens_per_s']:>9.2f} "
            f"{r['spec_tokens_per_s']:>10.2f} {r['speedup']:>7.2f} {str(r['same_output']):>5} {steps:>11} "
            f"{r['acceptance']:>6.2f} "
            f"{r['mean_accepted_length']:>8.2f}"
        )
    if FLAGS.output_json:
        meta = {
            "model": FLAGS.model,
            "speculative": FLAGS.speculative,
            "speculative_model": FLAGS.speculative_model,
            "num_speculative_tokens": FLAGS.num_speculative_tokens,
            "max_tokens": FLAGS.max_tokens,
            "token_budget": FLAGS.token_budget,
            "load_average": os.getloadavg(),
            "command": "python scripts/bench_speculative.py "
            + " ".join(f"--{k}={v}" for k, v in FLAGS.flag_values_dict().items() if k in _OWN_FLAGS),
        }
        with open(FLAGS.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        plot(rows, os.path.splitext(FLAGS.output_json)[0] + ".png")
        print(f"wrote {FLAGS.output_json}")


if __name__ == "__main__":
    app.run(main)
