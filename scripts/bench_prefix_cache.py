"""Prefix caching, on vs off, in one run: what a shared prefix and a multi-turn chat save, and what the
cache costs when nothing is shared.

Workloads (`--workloads`, comma-separated; all by default), SmolLM2 on this machine, driven through the
server's own engine thread (`ReplicaRouter` / `AsyncEngine`, the code behind the HTTP routes, without
HTTP), greedy, EOS ignored so every request generates exactly its tokens:

- `shared`: 32 requests sharing a 1,000-token system prompt, each with a ~64-token question and 32 new
  tokens, sent as one burst and by 8 closed-loop clients: mean and P90 time to first token, throughput.
- `multiturn`: 8 conversations of 6 turns after a 200-token system prompt, each turn ~100 tokens of user
  text and 48 generated, rendered with the chat template: prefill tokens computed, mean TTFT per turn,
  and how many tokens of each turn's prompt agree with the previous prompt + answer as generated (what
  the template re-renders identically, hence what the cache can serve at most).
- `host`: the host cost of the cache at a 0% hit rate, measured directly: scheduler schedule +
  postprocess microseconds per decode step at 32 and 256 running sequences with random prompts, on vs
  off, against the time of a SmolLM2 decode step on this machine.
- `replicas`: two replicas (one forced CPU device each): hit rate of 8 system prompts x 6 requests with
  cache-aware routing vs least-work routing.

Cache off is the same engine with its scheduler's `prefix_caching` switched off (no recompile); the
cache is reset before every run. Prints tables, writes JSON and a plot:

    python scripts/bench_prefix_cache.py --output=docs/benchmarks/prefix_cache_cpu
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before jax loads
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"

import asyncio
import json
import platform
import statistics
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint to serve.")
flags.DEFINE_string("workloads", "shared,multiturn,host,replicas", "Which workloads to run.")
flags.DEFINE_string("output", "docs/benchmarks/prefix_cache_cpu", "Prefix of the JSON and PNG written.")
flags.DEFINE_integer("token_budget", 512, "Token budget per step.")

WORDS = (
    "the of and to in is was for on that with as by at from his her they this have had not are but "
    "which one all were when we there can an been has more if will would who so no out up into what "
    "about time than them only other new some could these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three river "
    "mountain city harbour train museum garden market bridge castle island valley forest lake coast"
).split()


def text_of(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


def tokens_of(tokenizer, rng: np.random.Generator, n: int) -> list[int]:
    """Exactly `n` token ids of plain English-like text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(" " + text_of(rng, n), add_special_tokens=False)
    return ids[:n]


# ---------------------------------------------------------------------------- driving the engine


class Driver:
    """Submits requests to a router from asyncio and records time to first token and the tokens."""

    def __init__(self, router):
        self.router = router
        self._ids = 0

    async def run(self, prompt: list[int], new_tokens: int) -> dict:
        from fastgen_jax.sampling_params import SamplingParams
        from fastgen_jax.server.async_engine import GenerationRequest

        self._ids += 1
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        start = time.monotonic()
        group = self.router.submit([GenerationRequest(f"b{self._ids}", prompt, params)])
        ttft, token_ids, cached, text = None, [], 0, ""
        async for _, out in group:
            if ttft is None and out.new_token_ids:
                ttft = time.monotonic() - start
            token_ids += out.new_token_ids
            text += out.new_text
            cached = out.num_cached_tokens
        return {
            "ttft": ttft,
            "latency": time.monotonic() - start,
            "tokens": token_ids,
            "text": text,
            "cached": cached,
        }


def engine_totals(router) -> dict:
    stats = [r.engine.stats for r in router.replicas]
    return {
        "prompt_tokens_computed": sum(s.prompt_tokens for s in stats),
        "generation_tokens": sum(s.generation_tokens for s in stats),
        "prefix_cache_queries": sum(s.prefix_cache_queries for s in stats),
        "prefix_cache_hits": sum(s.prefix_cache_hits for s in stats),
    }


def set_caching(router, enabled: bool) -> None:
    """Switches the (idle) engines' prefix cache on or off and empties it, on their own threads."""

    def switch(engine):
        engine.scheduler.prefix_caching = enabled
        return engine.reset_prefix_cache()

    async def all_replicas():
        return [await r.call(switch) for r in router.replicas]

    asyncio.run(all_replicas())


def measure(router, caching: bool, body) -> dict:
    """Runs the coroutine `body(driver)` with the cache on or off; adds engine counters and wall time."""
    set_caching(router, caching)
    before = engine_totals(router)
    start = time.monotonic()
    results = asyncio.run(body(Driver(router)))
    wall = time.monotonic() - start
    after = engine_totals(router)
    delta = {k: after[k] - before[k] for k in after}
    return {"caching": caching, "wall_s": wall, **delta, "results": results}


def summary(run: dict) -> dict:
    ttfts = [r["ttft"] for r in run["results"]]
    return {
        "caching": run["caching"],
        "requests": len(ttfts),
        "mean_ttft_s": statistics.mean(ttfts),
        "p90_ttft_s": float(np.percentile(ttfts, 90)),
        "requests_per_s": len(ttfts) / run["wall_s"],
        "generated_tokens_per_s": run["generation_tokens"] / run["wall_s"],
        "prompt_tokens_computed": run["prompt_tokens_computed"],
        "prefix_cache_hit_rate": run["prefix_cache_hits"] / max(run["prefix_cache_queries"], 1),
        "wall_s": run["wall_s"],
    }


# ---------------------------------------------------------------------------- workloads


def shared_prefix(router, tokenizer) -> dict:
    rng = np.random.default_rng(0)
    system = tokens_of(tokenizer, rng, 1000)
    prompts = [system + tokens_of(tokenizer, rng, int(n)) for n in rng.integers(56, 73, 32)]

    async def burst(driver):
        return await asyncio.gather(*(driver.run(p, 32) for p in prompts))

    async def closed_loop(driver, clients=8):
        queue = list(prompts)
        results = []

        async def client():
            while queue:
                results.append(await driver.run(queue.pop(0), 32))

        await asyncio.gather(*(client() for _ in range(clients)))
        return results

    out = {}
    for name, body in (("burst", burst), ("closed_loop_8", closed_loop)):
        runs = [measure(router, caching, body) for caching in (False, True)]
        texts = [sorted(r["text"] for r in run["results"]) for run in runs]
        assert texts[0] == texts[1], "greedy outputs differ with the cache on and off"
        out[name] = [summary(r) for r in runs]
    return out


def multi_turn(router, tokenizer) -> dict:
    rng = np.random.default_rng(1)
    system = " ".join(rng.choice(WORDS, 160))
    users = [[text_of(rng, 75) for _ in range(6)] for _ in range(8)]

    async def conversations(driver):
        turns = [[] for _ in range(6)]  # per turn: (ttft, computed prompt agreement)

        async def conversation(c):
            messages = [{"role": "system", "content": system}]
            previous = None
            for t in range(6):
                messages.append({"role": "user", "content": users[c][t]})
                prompt = tokenizer.encode_chat(messages)
                agree = 0
                if previous is not None:
                    while agree < min(len(prompt), len(previous)) and prompt[agree] == previous[agree]:
                        agree += 1
                r = await driver.run(prompt, 48)
                turns[t].append(
                    {
                        **r,
                        "prompt_len": len(prompt),
                        "agree": agree,
                        "history_len": 0 if previous is None else len(previous),
                    }
                )
                previous = prompt + r["tokens"]
                messages.append({"role": "assistant", "content": r["text"]})

        await asyncio.gather(*(conversation(c) for c in range(8)))
        return turns

    runs = [measure(router, caching, conversations) for caching in (False, True)]
    texts = [[sorted(r["text"] for r in turn) for turn in run["results"]] for run in runs]
    assert texts[0] == texts[1], "greedy outputs differ with the cache on and off"
    per_turn = []
    for t in range(6):
        row = {"turn": t + 1}
        for run in runs:
            key = "on" if run["caching"] else "off"
            row[f"mean_ttft_s_{key}"] = statistics.mean(r["ttft"] for r in run["results"][t])
            row[f"cached_tokens_{key}"] = sum(r["cached"] for r in run["results"][t])
        cached_run = runs[1]["results"][t]
        row["prompt_tokens"] = sum(r["prompt_len"] for r in cached_run)
        row["history_tokens"] = sum(r["history_len"] for r in cached_run)
        row["history_tokens_rerendered_identically"] = sum(r["agree"] for r in cached_run)
        per_turn.append(row)
    return {
        "prompt_tokens_computed": {
            ("on" if r["caching"] else "off"): r["prompt_tokens_computed"] for r in runs
        },
        "wall_s": {("on" if r["caching"] else "off"): r["wall_s"] for r in runs},
        "per_turn": per_turn,
    }


def host_cost(router) -> dict:
    """Scheduler time per decode step with random prompts (no shared prefix), cache on vs off: the mean
    over 400 decode steps (every sequence fills a page each 16 steps), best of three runs each."""
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.engine import Scheduler, Sequence

    rows = []
    for num_seqs in (32, 256):
        times = {}
        for caching in (False, True) * 3:
            config = EngineConfig(
                token_budget=2048,
                max_num_seqs=num_seqs,
                max_model_len=2048,
                num_pages=num_seqs * 40,
                enable_prefix_caching=caching,
            )
            s = Scheduler(config)
            rng = np.random.default_rng(num_seqs)
            for i in range(num_seqs):
                s.add(Sequence(str(i), rng.integers(3, 49000, 200).tolist(), max_tokens=1500))
            while s.num_waiting or any(q.is_prefilling for q in s.running):
                out = s.schedule()
                s.postprocess(out, rng.integers(3, 49000, out.num_seqs))
            sampled = [rng.integers(3, 49000, num_seqs) for _ in range(400)]
            start = time.perf_counter()
            for tokens in sampled:
                s.postprocess(s.schedule(), tokens)
            times.setdefault(caching, []).append((time.perf_counter() - start) / len(sampled))
            assert s.prefix_cache_hits == 0
        off, on = min(times[False]), min(times[True])
        rows.append(
            {
                "running_seqs": num_seqs,
                "scheduler_us_per_step_off": 1e6 * off,
                "scheduler_us_per_step_on": 1e6 * on,
                "cache_us_per_step": 1e6 * (on - off),
            }
        )
    # SmolLM2 decode steps on this machine, for scale.
    engine = router.replicas[0].engine
    steps = {
        n: 1e3 * decode_step_seconds(engine, n) for n in (32, 256) if n <= engine.engine_config.max_num_seqs
    }
    return {"rows": rows, "smollm2_decode_step_ms": steps}


def decode_step_seconds(engine, num_seqs: int) -> float:
    from fastgen_jax.sampling_params import SamplingParams

    rng = np.random.default_rng(3)
    for _ in range(num_seqs):
        engine.add_request(
            prompt_token_ids=rng.integers(3, 49000, 64).tolist(),
            sampling_params=SamplingParams(max_new_tokens=12, ignore_eos=True),
        )
    while any(q.is_prefilling for q in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[:-1])


def replicas(engines, tokenizer) -> dict:
    from fastgen_jax.server.replicas import ReplicaRouter

    rng = np.random.default_rng(2)
    systems = [tokens_of(tokenizer, rng, 300) for _ in range(8)]
    order = rng.permutation(np.repeat(np.arange(8), 6))
    prompts = [systems[i] + tokens_of(tokenizer, rng, 64) for i in order]

    async def closed_loop(driver, clients=8):
        queue, results = list(prompts), []

        async def client():
            while queue:
                results.append(await driver.run(queue.pop(0), 16))

        await asyncio.gather(*(client() for _ in range(clients)))
        return results

    out = []
    for cache_aware in (False, True):
        router = ReplicaRouter(engines, cache_aware=cache_aware)
        router.start()
        try:
            run = measure(router, True, closed_loop)
        finally:
            router.stop()
        out.append(
            {
                "routing": "cache-aware" if cache_aware else "least work",
                **summary(run),
                "routed": [r.routed for r in router.replicas],
            }
        )
    return {
        "workload": "8 system prompts of 300 tokens x 6 requests (64-token question, 16 new), "
        "8 closed-loop clients",
        "rows": out,
    }


# ---------------------------------------------------------------------------- report


def print_tables(report: dict) -> None:
    for name, rows in report.get("shared", {}).items():
        print(f"\nshared 1,000-token system prompt, 32 requests, {name}")
        print(
            f"{'cache':>6} | {'mean TTFT s':>11} | {'P90 TTFT s':>10} | {'req/s':>6} | {'gen tok/s':>9} | "
            f"{'prompt tok computed':>19}"
        )
        for r in rows:
            print(
                f"{'on' if r['caching'] else 'off':>6} | {r['mean_ttft_s']:>11.2f} | "
                f"{r['p90_ttft_s']:>10.2f} | {r['requests_per_s']:>6.2f} | "
                f"{r['generated_tokens_per_s']:>9.1f} | {r['prompt_tokens_computed']:>19}"
            )
        off, on = rows
        print(
            f"mean TTFT {off['mean_ttft_s'] / on['mean_ttft_s']:.1f}x lower, throughput "
            f"{on['requests_per_s'] / off['requests_per_s']:.1f}x"
        )
    if "multiturn" in report:
        m = report["multiturn"]
        print("\nmulti-turn: 8 conversations x 6 turns")
        print(
            f"{'turn':>4} | {'TTFT off s':>10} | {'TTFT on s':>9} | {'cached tok':>10} | "
            f"{'history tok':>11} | {'re-rendered same':>16}"
        )
        for r in m["per_turn"]:
            print(
                f"{r['turn']:>4} | {r['mean_ttft_s_off']:>10.2f} | {r['mean_ttft_s_on']:>9.2f} | "
                f"{r['cached_tokens_on']:>10} | {r['history_tokens']:>11} | "
                f"{r['history_tokens_rerendered_identically']:>16}"
            )
        c = m["prompt_tokens_computed"]
        print(f"prompt tokens computed: off {c['off']}, on {c['on']} ({c['off'] / c['on']:.1f}x fewer)")
    if "host" in report:
        h = report["host"]
        steps = ", ".join(f"{n} seqs {ms:.0f} ms" for n, ms in h["smollm2_decode_step_ms"].items())
        print(f"\nhost cost at 0% hits (a SmolLM2 decode step here: {steps})")
        print(f"{'seqs':>5} | {'sched us off':>12} | {'sched us on':>11} | {'cache us/step':>13}")
        for r in h["rows"]:
            print(
                f"{r['running_seqs']:>5} | {r['scheduler_us_per_step_off']:>12.1f} | "
                f"{r['scheduler_us_per_step_on']:>11.1f} | {r['cache_us_per_step']:>13.1f}"
            )
    if "replicas" in report:
        print(f"\nreplicas=2: {report['replicas']['workload']}")
        print(f"{'routing':>12} | {'hit rate':>8} | {'mean TTFT s':>11} | {'req/s':>6} | routed")
        for r in report["replicas"]["rows"]:
            print(
                f"{r['routing']:>12} | {r['prefix_cache_hit_rate']:>8.1%} | {r['mean_ttft_s']:>11.2f} | "
                f"{r['requests_per_s']:>6.2f} | {r['routed']}"
            )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("shared", "multiturn") if k in report]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "shared":
            names = list(report["shared"])
            x = np.arange(len(names))
            for j, label in enumerate(("off", "on")):
                ax.bar(
                    x + 0.4 * j,
                    [report["shared"][n][j]["mean_ttft_s"] for n in names],
                    0.4,
                    label=f"cache {label}",
                )
            ax.set_xticks(x + 0.2, names)
            ax.set_ylabel("mean time to first token (s)")
            ax.set_title("32 requests sharing a 1,000-token system prompt")
        else:
            rows = report["multiturn"]["per_turn"]
            turns = [r["turn"] for r in rows]
            ax.plot(turns, [r["mean_ttft_s_off"] for r in rows], "o-", label="cache off")
            ax.plot(turns, [r["mean_ttft_s_on"] for r in rows], "o-", label="cache on")
            ax.set_xlabel("turn")
            ax.set_ylabel("mean time to first token (s)")
            ax.set_title("8 conversations, 6 turns")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    import jax

    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.server.replicas import ReplicaRouter

    workloads = FLAGS.workloads.split(",")
    config = EngineConfig(
        token_budget=FLAGS.token_budget,  # the server's default buckets: 16, 32, ... up to the budget
        max_num_seqs=256,
        max_model_len=1536,
        num_pages=2048,
    )
    engines = [LLMEngine.from_pretrained(FLAGS.model, config, "float32", devices=[jax.devices()[0]])]
    if "replicas" in workloads:
        engines.append(LLMEngine.from_pretrained(FLAGS.model, config, "float32", devices=[jax.devices()[1]]))
    tokenizer = engines[0].tokenizer
    router = ReplicaRouter(engines[:1])
    router.start()
    report = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "model": FLAGS.model,
        "token_budget": FLAGS.token_budget,
    }
    try:
        if "shared" in workloads:
            print("workload: shared", flush=True)
            report["shared"] = shared_prefix(router, tokenizer)
        if "multiturn" in workloads:
            print("workload: multiturn", flush=True)
            report["multiturn"] = multi_turn(router, tokenizer)
    finally:
        router.stop()
    if "host" in workloads:
        print("workload: host", flush=True)
        report["host"] = host_cost(router)
    if "replicas" in workloads:
        print("workload: replicas", flush=True)
        report["replicas"] = replicas(engines, tokenizer)
    print_tables(report)
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(f"{FLAGS.output}.json", "w") as f:
        json.dump(report, f, indent=2, default=float)
    plot(report, f"{FLAGS.output}.png")
    print(f"\nwrote {FLAGS.output}.json and {FLAGS.output}.png")


if __name__ == "__main__":
    app.run(main)
