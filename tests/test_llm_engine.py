"""The batching engine against one-request-at-a-time greedy decoding with Hugging Face transformers."""

import collections
import time

import numpy as np
import pytest
import torch
import transformers

from fastgen_jax import llm_engine
from fastgen_jax.checkpoints import load_checkpoint
from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine, RequestError
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.sla import SLA
from fastgen_jax.tokenizer import Tokenizer

TINY_VOCAB = 512


def save_tiny_llama(tmp_path_factory, smollm2_dir, initializer_range=0.3, name="tiny-llama"):
    """A random 2-layer Llama (GQA 4:2) saved as a Hugging Face directory, with SmolLM2's tokenizer;
    returns (path, the transformers model)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    Tokenizer.from_hf_dir(smollm2_dir).save(path)
    return path, model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory, smollm2_dir)


def hf_greedy(model, prompt_ids, num_new):
    """Reference: one request alone, greedy, through transformers' own generate (EOS ignored)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=num_new,
            do_sample=False,
            min_new_tokens=num_new,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def mixed_workload(num_prompts, vocab, max_prompt, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_prompt, num_prompts)
    lengths[:4] = [max_prompt, 1, max_prompt // 2, 3]  # always some long ones
    prompts = [rng.integers(3, vocab, n).tolist() for n in lengths]
    num_new = rng.integers(4, 24, num_prompts).tolist()  # requests finish at different steps
    return prompts, num_new


def run_all(engine, prompts, num_new, **params):
    return run_with_logprobs(engine, prompts, num_new, **params)[0]


def run_with_logprobs(engine, prompts, num_new, **params):
    """Runs the prompts (EOS ignored) to the end; returns each one's tokens and log-probabilities."""
    ids = [
        engine.add_request(
            prompt_token_ids=p,
            sampling_params=SamplingParams(max_new_tokens=n, ignore_eos=True, **params),
        )
        for p, n in zip(prompts, num_new, strict=True)
    ]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.new_logprobs or []
    return [tokens[i] for i in ids], [logprobs[i] for i in ids]


@pytest.fixture(scope="module")
def tiny_workload(tiny_dir):
    _, model = tiny_dir
    prompts, num_new = mixed_workload(32, TINY_VOCAB, 300)
    return prompts, num_new, [hf_greedy(model, p, n) for p, n in zip(prompts, num_new, strict=True)]


# Overlap (async_scheduling) is the default; one budget also runs one step at a time.
# overlap off: `-m slow`, and every test of this file under `pytest --overlap=off` (README)
@pytest.mark.parametrize(
    "budget, overlap",
    [
        (64, True),
        pytest.param(128, True, marks=pytest.mark.slow),
        pytest.param(512, True, marks=pytest.mark.slow),
        pytest.param(128, False, marks=pytest.mark.slow),
    ],
)
def test_greedy_batch_equals_one_at_a_time(tiny_dir, tiny_workload, budget, overlap):
    prompts, num_new, expected = tiny_workload
    config = EngineConfig(
        token_budget=budget, max_num_seqs=32, max_model_len=512, page_size=16, async_scheduling=overlap
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    assert run_all(engine, prompts, num_new) == expected
    # Splitting happened (prompts of 300 tokens under a budget of 64/128) and nothing recompiled.
    assert engine.stats.prompt_tokens == sum(map(len, prompts))
    assert engine.stats.compiled_programs == len(engine.planner.shapes())
    assert engine.stats.compiled_after_warmup == 0


def test_an_adaptive_budget_changes_step_by_step_and_keeps_greedy_outputs(tiny_dir, tiny_workload):
    short = [i for i, (p, n) in enumerate(zip(*tiny_workload[:2], strict=True)) if len(p) + n <= 128]
    prompts, num_new, expected = ([x[i] for i in short] for x in tiny_workload)
    config = EngineConfig(
        token_budget=64,  # small shapes: 12 programs to compile
        adaptive_budget=True,
        sla_token_rate=1e4,  # 0.1 ms between tokens: no step fits while fresh sequences decode
        max_num_seqs=32,
        max_model_len=128,
        page_size=16,
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    assert len(prompts) >= 4 and run_all(engine, prompts, num_new) == expected
    assert engine.stats.token_budget_changes > 0
    assert engine.stats.token_budget in config.token_buckets
    assert engine.stats.compiled_after_warmup == 0


def test_every_output_carries_its_requests_one_timing_record(tiny_dir):
    """One record per request (`RequestTiming`, on its sequence) holds its token times, on the clock
    the outputs carry: what the budget controller protects and what the server judges are the same
    times, and its `missed` is the SLA judge's verdict. Aborted requests carry theirs too."""
    config = EngineConfig(
        token_budget=64,
        adaptive_budget=True,
        sla_prompt_rate=512.0,
        max_num_seqs=32,
        max_model_len=128,
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    prompts, num_new = mixed_workload(30, TINY_VOCAB, 60, seed=5)
    ids = [
        engine.add_request(
            prompt_token_ids=p, sampling_params=SamplingParams(max_new_tokens=n, ignore_eos=True)
        )
        for p, n in zip(prompts, num_new, strict=True)
    ]
    times, records, finished = collections.defaultdict(list), {}, set()
    steps = 0
    while engine.has_unfinished():
        outputs = engine.step()
        steps += 1
        if steps == 3:
            aborted = (engine.abort(rid) for rid in ids[-5:])
            outputs += [out for out in aborted if out is not None]  # None: finished in this step
        for out in outputs:
            assert records.setdefault(out.request_id, out.timing) is out.timing  # one record throughout
            times[out.request_id] += [out.time] * len(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(ids)
    judge = SLA(config.sla_prompt_rate, config.sla_token_rate)
    for rid, prompt in zip(ids, prompts, strict=True):
        record = records[rid]
        assert record.token_times == times[rid]
        if record.token_times:
            verdict = judge.judge(record.arrival, len(prompt), record.token_times)
            assert record.missed == (not verdict.both)


# Slow (18 s): in the default suite eviction and recompute are checked by
# tests/test_prefix_cache.py (a tiny pool) and tests/test_speculative.py (with speculation).
@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])  # and --overlap=off
def test_eviction_and_recompute_keep_greedy_outputs(tiny_dir, overlap):
    _, model = tiny_dir
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, TINY_VOCAB, int(n)).tolist() for n in rng.integers(20, 100, 16)]
    num_new = rng.integers(40, 80, 16).tolist()
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, num_new, strict=True)]
    # 16 usable pages of 16 tokens (one max_model_len sequence) for 16 requests of ~130 tokens.
    engine = LLMEngine(
        load_checkpoint(tiny_dir[0]),
        EngineConfig(
            token_budget=128,
            max_num_seqs=32,
            max_model_len=256,
            page_size=16,
            num_pages=17,
            async_scheduling=overlap,
        ),
        progress=False,
    )
    assert run_all(engine, prompts, num_new) == expected
    assert engine.stats.preemptions >= 10
    assert engine.stats.free_pages == engine.stats.total_pages
    assert engine.stats.compiled_after_warmup == 0


def test_overlapped_steps_stop_abort_share_and_preempt_exactly_like_one_at_a_time(tiny_dir, tiny_workload):
    """Stop tokens mid-batch (the overlapped next step already computed one token too many), aborts
    while a step is in flight, the same prompt twice (n > 1: a shared prefix), and a pool small
    enough to preempt: every output is the one-request-at-a-time greedy answer, cut where it must."""
    fits = [i for i, (p, n) in enumerate(zip(*tiny_workload[:2], strict=True)) if len(p) + n <= 120]
    fits = sorted(fits, key=lambda i: -len(tiny_workload[0][i]))[:10]  # the longest first
    prompts, num_new, expected = ([x[i] for i in fits] for x in tiny_workload)
    prompts, num_new, expected = prompts + prompts[:2], num_new + num_new[:2], expected + expected[:2]
    config = EngineConfig(
        token_budget=64, max_num_seqs=16, max_model_len=128, page_size=16, num_pages=9
    )  # 8 usable pages (one sequence of max_model_len) for 12 requests of up to 8 pages: preemption
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    stops = [len(e) // 2 if i % 3 == 0 else None for i, e in enumerate(expected)]  # stop at that token
    ids = []
    for p, n, e, stop in zip(prompts, num_new, expected, stops, strict=True):
        stop_ids = [] if stop is None else [e[stop]]
        params = SamplingParams(max_new_tokens=n, ignore_eos=True, stop_token_ids=stop_ids)
        ids.append(engine.add_request(prompt_token_ids=p, sampling_params=params))
    aborted = {ids[1], ids[4]}
    tokens, reasons = {i: [] for i in ids}, {}
    for step in range(10_000):
        if not engine.has_unfinished():
            break
        if step == 3:  # before either can have its (at least 4) tokens
            for i in aborted:
                reasons[i] = engine.abort(i).finish_reason
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    for i, e, stop in zip(ids, expected, stops, strict=True):
        got = tokens[i]
        if i in aborted:
            assert reasons[i] == "abort" and got == e[: len(got)]
        elif stop is not None:
            first = e.index(e[stop])  # the stop token may occur earlier in the answer
            assert (got, reasons[i]) == (e[: first + 1], "stop")
        else:
            assert (got, reasons[i]) == (e, "length")
    assert engine.stats.preemptions > 0 and engine.stats.prefix_cache_hits > 0
    assert engine.stats.compiled_after_warmup == 0
    assert engine.scheduler.num_free_pages == engine.stats.total_pages


class _ReadLog:
    """A sampled-token array whose reading back to the host is logged (a runner double's output)."""

    def __init__(self, array, events, step):
        self.array, self.events, self.step = array, events, step

    def __array__(self, dtype=None, copy=None):
        self.events.append(("read", self.step))
        return np.asarray(self.array, dtype)


@pytest.mark.overlap
@pytest.mark.parametrize("overlap", [True, False])
def test_with_overlap_each_step_is_launched_before_the_previous_steps_tokens_are_read(tiny_dir, overlap):
    config = EngineConfig(
        token_budget=64, token_buckets=(64,), max_num_seqs=8, max_model_len=64, async_scheduling=overlap
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    events, execute = [], engine.runner.execute

    def logged_execute(plan, token_bitmask=None):
        step = sum(kind == "launch" for kind, _ in events)
        events.append(("launch", step))
        tokens, *rest = execute(plan, token_bitmask)
        return (_ReadLog(tokens, events, step), *rest)

    engine.runner.execute = logged_execute
    rng = np.random.default_rng(3)
    run_all(engine, [rng.integers(3, TINY_VOCAB, 10).tolist() for _ in range(4)], [12] * 4)
    launches = [step for kind, step in events if kind == "launch"]
    assert len(launches) >= 12
    for step in launches[1:]:  # the device never waits for the host to read a step and plan the next
        launch, read = events.index(("launch", step)), events.index(("read", step - 1))
        assert (launch < read) == overlap


@pytest.mark.overlap
@pytest.mark.parametrize("overlap", [True, False])
def test_the_step_time_model_learns_the_gaps_between_steps_tokens(tiny_dir, monkeypatch, overlap):
    """The SLA judges the gaps between a request's tokens, so the model learns those: with overlap a
    step runs while the caller hands out the last one's tokens, and its time counts from then."""
    config = EngineConfig(
        token_budget=64,
        token_buckets=(64,),
        max_num_seqs=8,
        max_model_len=64,
        async_scheduling=overlap,
        policy="sla",
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    learnt = []
    monkeypatch.setattr(
        llm_engine, "observe_step", lambda model, bucket, work, seconds: learnt.append(seconds)
    )
    rng = np.random.default_rng(4)
    for _ in range(4):
        engine.add_request(
            prompt_token_ids=rng.integers(3, TINY_VOCAB, 10).tolist(),
            sampling_params=SamplingParams(max_new_tokens=6, ignore_eos=True),
        )
    while engine.has_unfinished():
        engine.step()
        time.sleep(0.3)  # the caller's time between steps (a server handing the tokens out)
    assert len(learnt) >= 6
    if overlap:  # every step but the first ran while the caller slept
        assert min(learnt[1:]) >= 0.3
    else:  # one step at a time: launched after the caller's sleep, timed from the call
        assert min(learnt) < 0.3


@pytest.mark.overlap
@pytest.mark.parametrize("policy", ["splitfuse", pytest.param("sla", marks=pytest.mark.slow)])  # sla: -m slow
def test_late_launch_puts_requests_that_came_during_a_step_in_the_next_one(tiny_dir, tiny_workload, policy):
    """`launch_timing="late"` with an intake (as the server runs it): a request that arrives while a
    step runs is in the step launched next, not the one after, and greedy outputs stay exact."""
    prompts, num_new, expected = tiny_workload
    config = EngineConfig(
        token_budget=128,
        max_num_seqs=32,
        max_model_len=512,
        page_size=16,
        policy=policy,
        launch_timing="late",
    )
    engine = LLMEngine(load_checkpoint(tiny_dir[0]), config, progress=False)
    composed, schedule = [], engine.scheduler.schedule

    def logged_schedule(budget=None):
        out = schedule(budget)
        composed.append(({e.seq.request_id for e in out.scheduled}, out.num_tokens))
        return out

    engine.scheduler.schedule = logged_schedule
    read, postprocess = [0], engine.scheduler.postprocess

    def counted_postprocess(*args, **kwargs):
        read[0] += 1
        return postprocess(*args, **kwargs)

    engine.scheduler.postprocess = counted_postprocess
    arriving, added_at, tokens = list(range(len(prompts))), {}, collections.defaultdict(list)
    in_flight = []  # steps composed and not yet read back, at each arrival during a step

    def intake():  # one request arrives during each step
        if arriving:
            i = arriving.pop(0)
            params = SamplingParams(max_new_tokens=num_new[i], ignore_eos=True)
            in_flight.append(len(composed) - read[0])
            added_at[
                engine.add_request(prompt_token_ids=prompts[i], sampling_params=params, request_id=str(i))
            ] = len(composed)

    while arriving or engine.has_unfinished():
        if not engine.has_unfinished():
            intake()
        for out in engine.step(intake=intake):
            tokens[out.request_id] += out.new_token_ids
    assert [tokens[str(i)] for i in range(len(prompts))] == expected
    # each was in the first step composed after it arrived, unless that step was full
    joined = [rid in composed[n][0] for rid, n in added_at.items() if n]
    late = [rid for rid, n in added_at.items() if n and rid not in composed[n][0] and composed[n][1] < 128]
    assert late == [] and sum(joined) >= 4
    # ... and that step is the one after the step in flight: an early launch would have composed it
    assert set(in_flight[1:]) == {1}, in_flight


@pytest.mark.parametrize("policy", ["prefill_first", "sla"])
def test_every_policy_gives_the_same_greedy_outputs(tiny_dir, tiny_workload, policy):
    prompts, num_new, expected = tiny_workload
    engine = LLMEngine(
        load_checkpoint(tiny_dir[0]),
        EngineConfig(
            token_budget=128,
            max_num_seqs=32,
            max_model_len=512,
            page_size=16,
            policy=policy,
            # "sla": prompt deadlines some prompts can meet, loose token gaps: decodes are deferred for
            # them (on this machine; how many depends on its speed, so it is not asserted)
            sla_prompt_rate=300.0,
            sla_token_rate=0.1,
        ),
        progress=False,
    )
    assert run_all(engine, prompts, num_new) == expected


@pytest.mark.slow  # about 100 s: the real model's engine against transformers (CI time); -m slow
def test_smollm2_greedy_batch_equals_transformers(smollm2_dir, hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    texts = [
        "The capital of France is",
        "def quicksort(arr):",
        "Once upon a time",
        "List three colours:",
        "日本の首都は",
        "1, 1, 2, 3, 5, 8,",
    ]
    rng = np.random.default_rng(1)
    prompts = [hf_tokenizer(t)["input_ids"] for t in texts]
    prompts += [rng.integers(3, 49152, int(n)).tolist() for n in rng.integers(2, 180, 6)]
    num_new = [12] * len(prompts)
    expected = [hf_greedy(hf_model, p, n) for p, n in zip(prompts, num_new, strict=True)]
    engine = LLMEngine(
        load_checkpoint(smollm2_dir),
        EngineConfig(
            token_budget=64, token_buckets=(16, 64), max_num_seqs=32, max_model_len=256, page_size=32
        ),
        progress=False,
    )
    assert run_all(engine, prompts, num_new) == expected


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    return LLMEngine(
        load_checkpoint(smollm2_dir),
        EngineConfig(
            token_budget=64, token_buckets=(16, 64), max_num_seqs=16, max_model_len=256, page_size=64
        ),
        progress=False,
    )


def chat(engine, question):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def generate(engine, prompt, **params):
    rid = engine.add_request(prompt, SamplingParams(**params))
    text, final = "", None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                text += out.new_text
                final = out
    return text, final


def test_eos_stops_with_reason_stop(smollm2_engine):
    text, final = generate(
        smollm2_engine, chat(smollm2_engine, "What is the capital of France?"), max_new_tokens=40
    )
    assert text == "The capital of France is Paris."
    assert (final.finish_reason, final.generated_length) == ("stop", 8)  # 7 tokens + <|im_end|>


def test_ignore_eos_runs_to_max_new_tokens(smollm2_engine):
    _, final = generate(
        smollm2_engine,
        chat(smollm2_engine, "What is the capital of France?"),
        max_new_tokens=12,
        ignore_eos=True,
    )
    assert (final.finish_reason, final.generated_length) == ("length", 12)


def test_stop_string_spanning_tokens_cuts_the_text(smollm2_engine):
    text, final = generate(
        smollm2_engine,
        chat(smollm2_engine, "What is the capital of France?"),
        max_new_tokens=40,
        stop=["of Fr"],
    )
    assert (text, final.finish_reason) == ("The capital ", "stop")


def test_stop_token_id_and_min_new_tokens(smollm2_engine):
    prompt = chat(smollm2_engine, "What is the capital of France?")
    period = smollm2_engine.tokenizer.encode(".")[0]
    text, final = generate(smollm2_engine, prompt, max_new_tokens=40, stop_token_ids=[period])
    assert (text, final.finish_reason) == ("The capital of France is Paris", "stop")
    _, final = generate(smollm2_engine, prompt, max_new_tokens=10, min_new_tokens=10)
    assert (final.finish_reason, final.generated_length) == ("length", 10)


@pytest.mark.slow  # about 24 s (CI time; the server's seed test stays in the default suite); -m slow
def test_same_seed_same_text_whatever_else_is_running(smollm2_engine):
    prompt = chat(smollm2_engine, "Tell me a story about a cat.")
    params = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    alone, _ = generate(smollm2_engine, prompt, **params)
    for i in range(5):
        smollm2_engine.add_request(
            chat(smollm2_engine, f"Count to {i + 3}."),
            SamplingParams(max_new_tokens=20, temperature=0.8, seed=i),
        )
    crowded, _ = generate(smollm2_engine, prompt, **params)
    other_seed, _ = generate(smollm2_engine, prompt, **{**params, "seed": 7})
    assert crowded == alone
    assert other_seed != alone


def test_streamed_deltas_join_to_the_full_text(smollm2_engine):
    text, final = generate(
        smollm2_engine,
        chat(smollm2_engine, "Write a poem with emoji 🌊."),
        max_new_tokens=30,
        ignore_eos=True,
    )
    assert final.generated_length == 30
    assert "\ufffd" not in text


def test_abort_frees_pages_at_once(smollm2_engine):
    engine = smollm2_engine
    ids = [engine.add_request(chat(engine, f"Say {i}"), SamplingParams(max_new_tokens=50)) for i in range(4)]
    for _ in range(3):
        engine.step()
    for rid in ids:
        out = engine.abort(rid)
        assert out is None or out.finish_reason == "abort"
    assert not engine.has_unfinished()
    assert engine.scheduler.num_free_pages == engine.stats.total_pages
    assert engine.abort("never-existed") is None


def test_logprobs_on_request_match_transformers(smollm2_engine, hf_smollm2):
    hf_model, _ = hf_smollm2
    prompt = chat(smollm2_engine, "What is the capital of France?")
    rid = smollm2_engine.add_request(prompt, SamplingParams(max_new_tokens=4, logprobs=True))
    tokens, logprobs = [], []
    while smollm2_engine.has_unfinished():
        for out in smollm2_engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
    assert out.request_id == rid and len(logprobs) == len(tokens) == 4
    ids = smollm2_engine.tokenizer.encode(prompt) + tokens
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -5:-1]
    expected = torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor(tokens)].numpy()
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_bad_requests_are_refused_with_a_reason(smollm2_engine):
    with pytest.raises(RequestError, match="prompt is empty"):
        smollm2_engine.add_request(prompt_token_ids=[])
    with pytest.raises(RequestError, match="prompt has 300 tokens"):
        smollm2_engine.add_request(prompt_token_ids=[5] * 300)
    with pytest.raises(RequestError, match=r"token ids must lie in \[0, 49152\)"):
        smollm2_engine.add_request(prompt_token_ids=[49152])
    assert not smollm2_engine.has_unfinished()
