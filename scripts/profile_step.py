"""Where a step's time goes on this machine: matmuls, attention, KV writes, sampling and the host, each
beside its floor.

    python scripts/profile_step.py --model=checkpoints/smollm2-135m-instruct
    python scripts/profile_step.py --attention_impl=reference    # the same with another kernel
    python scripts/profile_step.py --f32_kernel_rows=0 --packed=off   # float32 projections by XLA's dot

Step kinds, each a slab built as the engine's `StepPlanner` would (same bucket, slots and page-table
width), with every sequence's pages scattered over the pool; no prefill is run, since attention costs
the same over any key values (a 32 x 2k decode would otherwise need 64k prompt tokens first):
- decode-only: `--decode_seqs` sequences (each kind's value) at contexts `--contexts`;
- prompt-only: one prompt chunk of `--token_budget` tokens, no context;
- fused: `--fused_decodes` decodes at context 512 beside a prompt chunk (after 256 tokens of its
  prompt) filling the budget.

For each kind:
- device: the engine's compiled step program (the runner's executable) on the slab;
- matmuls: the layer projections (qkv, o, gate_up, down: fused as the model runs them) over the
  slab's rows for every layer, plus the LM head over the logits rows, as one program of the model's
  own `Attention.matmul` (or `int8_matmul`, or `packed_matmul` where the runner packs its weights:
  `fastgen_jax.weight_layout`) over weights of the model's shapes, called as the model calls them
  (each layer's stack in place, `rows=` the slab's real rows, which the CPU kernels alone multiply);
- attention: the configured attention implementation on the captured metadata, once per layer
  over the engine's own KV pool;
- kv_write: the K/V write of the slab's rows into every layer's pages (donated pool), as the
  configured attention implementation writes them;
- sampling: `sampler.sample` on logits of the captured shape;
- other: device - (matmuls + attention + kv_write + sampling): norms, RoPE, embedding, residuals.
The host's share is measured once, on real sequences decoding through `LLMEngine.step()`: its median
time minus the device program's on the same slab.

Floors, from two ceilings measured here before and after each kind, the faster of the two (a large
f32 matmul, FLOP/s; a large reduction, bytes read/s; the table's GB/s): matmuls max(FLOPs / rate,
weight bytes / bandwidth); attention the K/V bytes every real row must read (each sequence's visible
keys once per layer) / bandwidth, or its FLOPs / rate if larger; kv_write the new rows' K/V bytes /
bandwidth; sampling the logits' bytes / bandwidth. Medians of `--repeats` runs. Prints a table and
writes JSON (`--output`).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Model directory.")
flags.DEFINE_list("contexts", ["128", "512", "2048"], "Contexts of the decode-only steps.")
flags.DEFINE_list("decode_seqs", ["1", "8", "32"], "Sequences in the decode-only steps.")
flags.DEFINE_integer("fused_decodes", 32, "Decodes beside the prompt chunk of the fused step.")
flags.DEFINE_integer("token_budget", 256, "Tokens per step (the prompt chunk's length).")
flags.DEFINE_string("attention_impl", "auto", "EngineConfig.attention_impl.")
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "EngineConfig.quantize (weight-only int8).")
flags.DEFINE_integer(
    "f32_kernel_rows",
    -1,
    "Override fastgen_jax.attention.F32_KERNEL_ROWS (-1: keep it; 0: XLA's dot for every float32 "
    "projection left in [K, N]), to compare the C++ float32 matmul against XLA's in whole steps. "
    "Packed projections ignore it: add --packed=off.",
)
flags.DEFINE_enum(
    "packed",
    "auto",
    ["auto", "on", "off"],
    "fastgen_jax.weight_layout.PACKED: whether the runner packs the float32 projections (auto: by the "
    "build: AVX-512 and AVX2).",
)
flags.DEFINE_enum(
    "kv_cache_dtype", "auto", ["auto", "float32", "bfloat16"], "EngineConfig.kv_cache_dtype (KV pages' type)."
)
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median reported).")
flags.DEFINE_integer("max_kv_tokens", 16384, "Skip decode kinds holding more keys (the KV pool's memory).")
flags.DEFINE_string("output", "docs/benchmarks/cpu_step_profile.json", "JSON output path.")


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each blocking `fn()`, after one untimed call of each, the functions taking
    turns in every repetition: the parts of one step kind are then timed over the same spells of this
    machine's moving speed (timed one after another, a part could land in a slower minute than the
    whole step, and "other" came out negative)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block), after one untimed call."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


class Ceilings:
    """(f32 matmul FLOP/s, bandwidth bytes/s read), measured on the default device. This machine's
    bandwidth moves with its neighbours (a run of this script read 31.8 GB/s, one minutes later 43.3,
    and a third 50.9), so each step kind is measured between two probes and its floors use the
    faster of them: a floor is the least time the part could take while it ran."""

    def __init__(self):
        import jax
        import jax.numpy as jnp

        n = 1024
        self.a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        # 512 MiB: about SmolLM2's float32 weights, far past the caches (a 64 MiB probe, used before,
        # read 1.5-2x faster than a decode step can read the weights: part of it came from the L3).
        self.x = jax.random.normal(jax.random.PRNGKey(2), (1 << 27,), jnp.float32)
        # A reduction reads without allocating: a fresh output buffer would time page faults instead.
        self.mm, self.read = jax.jit(lambda a, b: a @ b), jax.jit(lambda x: x.sum())

    def __call__(self) -> tuple[float, float]:
        n, a, x = self.a.shape[0], self.a, self.x
        t_mm = median_time(lambda: self.mm(a, a).block_until_ready(), 5)
        t_read = median_time(lambda: self.read(x).block_until_ready(), 5)
        return 2 * n**3 / t_mm, x.nbytes / t_read


def synthetic_plan(engine, seqs: list[tuple[int, int]], rng):
    """A `StepPlan` for `seqs`, (context, new tokens) per sequence, their pages scattered over the pool
    as a long-running server's are. No prefill runs: attention reads whatever the pages hold, which
    costs the same as real keys."""
    import numpy as np

    planner = engine.planner
    ps = planner.page_size
    rows = sum(new for _, new in seqs)
    pages_needed = [-(-(c + n) // ps) for c, n in seqs]
    plan = planner.padding(planner.bucket_for(rows), planner.width_for(max(pages_needed)))
    md = plan.attention  # frozen, but its numpy arrays are filled in place
    pool = rng.permutation(np.arange(1, planner.num_pages))
    first_page, row = 0, 0
    for i, ((context, new), used) in enumerate(zip(seqs, pages_needed, strict=True)):
        pages = pool[first_page : first_page + used]
        first_page += used
        md.page_indices[i, :used] = pages
        md.kv_lens[i] = context + new
        pos = np.arange(context, context + new)
        md.positions[row : row + new] = pos
        md.slot_mapping[row : row + new] = pages[pos // ps] * ps + pos % ps
        plan.token_ids[row : row + new] = rng.integers(100, 40000, new)
        row += new
        md.cu_q_lens[i + 1 :] = row
        md.logits_indices[i] = row - 1
    md.num_seqs[0] = len(seqs)
    return plan


def host_time(engine, seqs: int) -> tuple[float, float]:
    """(median engine.step() seconds, of which device) for `seqs` real sequences decoding at a short
    context: the host's share (schedule, slab, sampling settings, outputs) barely depends on context."""
    from fastgen_jax.sampling_params import SamplingParams

    captured = []
    inner = engine.runner.execute
    engine.runner.execute = lambda plan, mask=None: captured.append(plan) or inner(plan, mask)
    params = SamplingParams(max_new_tokens=4 * FLAGS.repeats + 8, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=[100 + i] * 16, sampling_params=params) for i in range(seqs)]
    while any(len(o.new_token_ids) == 0 for o in engine.step()) or engine.scheduler.num_waiting:
        pass  # prefill until every sequence decodes
    engine.step()  # compiles this shape if it is new
    times = []
    while len(times) < FLAGS.repeats:
        start = time.perf_counter()
        outs = engine.step()
        if len(outs) == seqs:
            times.append(time.perf_counter() - start)
    engine.runner.execute = inner
    device = components(engine, captured[-1], parts=False)["device"]
    for i in ids:
        engine.abort(i)
    return statistics.median(times), device


def components(engine, plan, parts: bool = True) -> dict[str, float]:
    """Seconds of the device program and of each part, on a step plan."""
    import jax
    import jax.numpy as jnp

    from fastgen_jax.sampler import sample

    runner, c = engine.runner, engine.model_config
    runner.compile(plan)
    executable = runner._executables[plan.shape]
    args = runner.step_args(plan)

    def device():
        out, runner.kv_cache, _ = executable(runner.params, runner.kv_cache, runner.sampled_tokens, *args)
        jax.block_until_ready(out)

    if not parts:
        return {"device": median_time(device, FLAGS.repeats)}

    rows, logits_rows = plan.bucket, plan.num_slots
    L, d, f, hd = c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim
    kvd = c.num_kv_heads * c.head_dim
    # fused as `parallel.fuse_projections` leaves them for the model: q/k/v in one, gate/up in one
    shapes = {"qkv": (d, hd + 2 * kvd), "o": (hd, d), "gate_up": (d, 2 * f), "down": (f, d)}
    x = jnp.ones((rows, d), runner.dtype)
    if FLAGS.quantize == "int8":  # int8 [L, N, K] and scales, multiplied as the model does
        weights = {
            n: (jnp.ones((L, s[1], s[0]), jnp.int8), jnp.full((L, s[1]), 0.01)) for n, s in shapes.items()
        }
        head = (jnp.ones((c.vocab_size, d), jnp.int8), jnp.full((c.vocab_size,), 0.01))
        mm, mm_head = runner.attention.int8_matmul, runner.attention.int8_matmul
    elif runner.attention.packs_weights:  # packed [L, strips, K, strip], as `weight_layout` stores them
        from cpu_kernels.matmul import pack_f32

        weights = {n: (pack_f32(jnp.full((L, *s), 0.01, runner.dtype)),) for n, s in shapes.items()}
        head = (pack_f32(jnp.full((d, c.vocab_size), 0.01, runner.dtype)),)  # the head packed too
        mm = None  # `p` below calls `packed_matmul`

        def mm_head(h, w, rows):
            return runner.attention.packed_matmul(h, w, None, (c.vocab_size,), rows=rows)
    else:
        weights = {n: (jnp.full((L, *s), 0.01, runner.dtype),) for n, s in shapes.items()}
        head = (jnp.full((c.vocab_size, d), 0.01, runner.dtype),)
        mm = runner.attention.matmul  # the C++ kernel for few rows on the CPU kernels, else XLA

        def mm_head(h, w, rows):
            return runner.attention.matmul(h, w, w_nk=True, rows=rows)

    @jax.jit
    def matmuls(x, weights, head, real):
        # as the model calls them: each layer's slice and its stack, only the slab's real rows
        def layer(h, i):
            def p(name, h):
                if FLAGS.quantize == "int8":
                    q, scale = weights[name]
                    return mm(h, q[i], scale[i], (q, scale, i), rows=real)
                if runner.attention.packs_weights:
                    w, n = weights[name][0], shapes[name][1]
                    return runner.attention.packed_matmul(h, w[i], (w, i), (n,), rows=real)
                return mm(h, weights[name][0][i], stack=(weights[name][0], i), rows=real)

            q, k, v = jnp.split(p("qkv", h), [hd, hd + kvd], axis=1)
            h = h + p("o", q + jnp.pad(k + v, ((0, 0), (0, hd - kvd))))
            gate, up = jnp.split(p("gate_up", h), 2, axis=1)
            return h + p("down", jax.nn.silu(gate) * up), None

        h, _ = jax.lax.scan(layer, x, jnp.arange(L))
        return mm_head(h[:logits_rows], *head, rows=jnp.minimum(real, logits_rows))

    real = jnp.int32(plan.attention.cu_q_lens[-1])  # the rows the model's projections multiply
    md = jax.device_put(plan.attention)
    k_pages = runner.kv_cache[0]  # only its shape: `device()` donates the cache it reads
    pages_per_layer = k_pages.shape[1] // L
    attend = runner._model.attention.paged_attention
    q = jnp.full((rows, c.num_heads, c.head_dim), 0.1, runner.dtype)

    @jax.jit
    def attention(q, k_pages, v_pages, md):
        def layer(acc, i):
            out = attend(q, k_pages, v_pages, md.kv_lens, md.page_indices + i * pages_per_layer,
                         md.cu_q_lens, md.num_seqs, sm_scale=0.125)  # fmt: skip
            return acc + out, None

        acc, _ = jax.lax.scan(layer, jnp.zeros_like(q), jnp.arange(L))
        return acc

    kv = jnp.ones((rows, c.num_kv_heads, c.head_dim), runner.dtype)
    slots = jnp.asarray(plan.attention.slot_mapping)

    @jax.jit
    def kv_write(pages, kv, slots):
        def layer(pages, i):
            in_range = slots < pages_per_layer * pages[0].shape[2]
            s = jnp.where(in_range, slots + i * pages_per_layer * pages[0].shape[2], 2**30)
            return runner.attention.write_kv(*pages, kv, kv, s), None

        pages, _ = jax.lax.scan(layer, pages, jnp.arange(L))
        return pages

    pool = [jnp.zeros_like(k_pages), jnp.zeros_like(k_pages)]
    kv_write_donated = jax.jit(kv_write, donate_argnums=0)

    def write():
        pool[:] = kv_write_donated(tuple(pool), kv, slots)
        jax.block_until_ready(pool)

    logits = jnp.full((logits_rows, c.vocab_size), 0.5, jnp.float32)
    s = jax.device_put(plan.sampling)
    sampler = jax.jit(sample)
    out = interleaved_medians({
        "device": device,
        "matmuls": lambda: matmuls(x, weights, head, real).block_until_ready(),
        "attention": lambda: attention(q, *runner.kv_cache, md).block_until_ready(),
        "kv_write": write,
        "sampling": lambda: jax.block_until_ready(sampler(logits, s)),
    }, FLAGS.repeats)  # fmt: skip
    out["other"] = out["device"] - out["matmuls"] - out["attention"] - out["kv_write"] - out["sampling"]
    return out


def floors(engine, plan, rate: float, bandwidth: float) -> dict[str, float]:
    """Seconds each part must take at least on this machine (see the module docstring)."""
    import numpy as np

    c, size = engine.model_config, engine.runner.dtype.itemsize
    weight_size = 1 if FLAGS.quantize == "int8" else size
    kv_size = engine.runner.kv_cache[0].dtype.itemsize
    md = plan.attention
    real = int(md.cu_q_lens[int(md.num_seqs[0])])
    logits_rows = plan.num_slots
    d, f, hd = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim
    kvd = c.num_kv_heads * c.head_dim
    layer_params = d * hd * 2 + d * kvd * 2 + 3 * d * f
    head_params = c.vocab_size * d
    matmul_flops = 2 * real * c.num_layers * layer_params + 2 * logits_rows * head_params
    matmul_bytes = (c.num_layers * layer_params + head_params) * weight_size
    n = int(md.num_seqs[0])
    kv_lens = md.kv_lens[:n].astype(np.int64)
    q_lens = np.diff(md.cu_q_lens[: n + 1]).astype(np.int64)
    kv_read = 2 * c.num_layers * kvd * int(kv_lens.sum()) * kv_size
    # Visible (query, key) pairs: each new row sees the keys before it and itself.
    pairs = int(np.sum(q_lens * (kv_lens - q_lens) + q_lens * (q_lens + 1) // 2))
    attention_flops = 4 * c.num_layers * hd * pairs
    return {
        "matmuls": max(matmul_flops / rate, matmul_bytes / bandwidth),
        "attention": max(kv_read / bandwidth, attention_flops / rate),
        "kv_write": 2 * c.num_layers * kvd * real * kv_size / bandwidth,
        "sampling": logits_rows * c.vocab_size * 4 / bandwidth,
        "weights_read": matmul_bytes / bandwidth,
    }


PARTS = ("matmuls", "attention", "kv_write", "sampling")


def report_row(name: str, parts: dict, floor: dict, plan) -> dict:
    return {
        "kind": name,
        "slab_rows": plan.bucket,
        "page_table_width": plan.page_table_width,
        **{f"{p}_ms": v * 1e3 for p, v in parts.items()},
        **{f"{p}_floor_ms": v * 1e3 for p, v in floor.items()},
    }


def print_table(rows: list[dict]) -> None:
    head = " ".join(f"{p:>16}" for p in PARTS)
    print(f"{'kind':>18} {'device':>7} {'floor':>7} {head} {'other':>7} {'GB/s':>5}  (ms: measured/floor)")
    for r in rows:
        cells = " ".join(f"{r[p + '_ms']:>7.2f}/{r[p + '_floor_ms']:<8.2f}" for p in PARTS)
        floor = sum(r[p + "_floor_ms"] for p in PARTS)
        print(f"{r['kind']:>18} {r['device_ms']:>7.2f} {floor:>7.2f} {cells} {r['other_ms']:>7.2f} "
              f"{r['bandwidth_gbs']:>5.1f}")  # fmt: skip


def step_kinds(contexts: list[int], seqs: list[int]) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(context, new tokens) per sequence]) for every step kind profiled."""
    budget, fused = FLAGS.token_budget, FLAGS.fused_decodes
    kinds = [(f"decode {b}x{ctx}", [(ctx - 1, 1)] * b) for ctx in contexts for b in seqs
             if b * ctx <= FLAGS.max_kv_tokens]  # fmt: skip
    kinds.append((f"prompt {budget}", [(0, budget)]))
    kinds.append((f"fused {fused}+{budget - fused}", [(511, 1)] * fused + [(256, budget - fused)]))
    return kinds


def main(argv):
    del argv
    import numpy as np

    from fastgen_jax.checkpoints import load_checkpoint
    from fastgen_jax.config import EngineConfig
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.runner import enable_compilation_cache

    enable_compilation_cache()  # the parts' programs repeat across kinds of the same shapes
    if FLAGS.f32_kernel_rows >= 0:
        from fastgen_jax import attention

        attention.F32_KERNEL_ROWS = FLAGS.f32_kernel_rows
    if FLAGS.packed != "auto":
        from fastgen_jax import weight_layout

        weight_layout.PACKED = FLAGS.packed == "on"

    contexts = [int(x) for x in FLAGS.contexts]
    seqs = [int(x) for x in FLAGS.decode_seqs]
    max_len = max(max(contexts), 1024) + 8 * FLAGS.repeats + 64
    kinds = step_kinds(contexts, seqs)
    config = EngineConfig(
        token_budget=FLAGS.token_budget,
        max_num_seqs=max(max(seqs), FLAGS.fused_decodes + 1),
        max_model_len=max_len,
        num_pages=max(sum(-(-(c + n) // 16) for c, n in s) for _, s in kinds) + 64,
        page_size=16,
        attention_impl=FLAGS.attention_impl,
        quantize=FLAGS.quantize,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(
        load_checkpoint(os.path.abspath(FLAGS.model), "float32"),
        config,
        "float32",
        warmup=False,
        progress=False,
    )
    ceilings = Ceilings()
    first_probe = before = ceilings()
    print(f"matmul {before[0] / 1e9:.1f} GFLOP/s, bandwidth {before[1] / 1e9:.1f} GB/s (f32, measured here)")
    rng = np.random.default_rng(0)
    rows = []
    for name, kind in kinds:
        plan = synthetic_plan(engine, kind, rng)
        parts = components(engine, plan)
        after = ceilings()
        rate, bandwidth = map(max, before, after)  # this kind's floors: the faster of the probes around it
        rows.append(report_row(name, parts, floors(engine, plan, rate, bandwidth), plan))
        rows[-1] |= {"matmul_gflops": rate / 1e9, "bandwidth_gbs": bandwidth / 1e9}
        print_table(rows[-1:])
        before = after
    step, device = host_time(engine, max(seqs))
    print()
    print_table(rows)
    print(f"host: engine.step() {step * 1e3:.2f} ms, of which device {device * 1e3:.2f} ms, for {max(seqs)} "
          f"sequences decoding at context 16-40")  # fmt: skip
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        summary = {
            "model": FLAGS.model,
            "attention_impl": FLAGS.attention_impl,
            "quantize": FLAGS.quantize,
            "kv_cache_dtype": FLAGS.kv_cache_dtype,
        }
        summary |= {"load": os.getloadavg()}
        # the first probe here; each row has the one its floors used
        summary |= {
            "matmul_gflops": first_probe[0] / 1e9,
            "bandwidth_gbs": first_probe[1] / 1e9,
            "rows": rows,
        }
        summary["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")  # fastgen_jax.hugepages
        summary |= {"host": {"sequences": max(seqs), "step_ms": step * 1e3, "device_ms": device * 1e3}}
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    from fastgen_jax import hugepages

    hugepages.restart_with_huge_pages()  # as the server runs: malloc on huge pages
    app.run(main)
