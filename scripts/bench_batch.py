"""Batch job benchmark: `python -m fastgen_jax.generate --input --output` against `fastgen_jax.pipeline`
on the same requests, each in its own process, with its memory watched.

The workload: `--num_requests` short completion prompts ("Fact 17: the colour of a lemon is", 8 to
12 tokens) in the OpenAI Batch format, greedy, `max_tokens` = `--max_tokens` with end-of-sequence
ignored, so every request generates exactly that many tokens in both runs. The pipeline gets the
same prompt strings and settings in one call (everything queued at once, results held in memory);
the batch job streams the file with its bounded number in flight and appends results as they finish.

Both use the same engine flags. Throughput is each run's own clock after start-up (the batch job's
summary line; the pipeline call's wall time), so loading and compiling are left out of both. Memory:
the parent samples each child's resident set (VmRSS) every 0.2 s and reports the peak
(`wait4`'s ru_maxrss) and the samples taken when 25/50/75/100% of the batch job's lines were written,
which shows whether memory grows with the number of requests done. The generated texts of the two
runs are compared request by request.

    python scripts/bench_batch.py --num_requests=2000 --max_tokens=16 \
        --output_json=docs/benchmarks/batch_cpu.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "checkpoints/smollm2-135m-instruct", "Checkpoint directory.")
flags.DEFINE_integer("num_requests", 2000, "Requests in the batch file.")
flags.DEFINE_integer("max_tokens", 16, "Tokens generated per request (end-of-sequence ignored).")
flags.DEFINE_integer("token_budget", 256, "Engine token budget.")
flags.DEFINE_integer("max_num_seqs", 128, "Engine sequences per step.")
flags.DEFINE_integer("max_model_len", 256, "Engine context length.")
flags.DEFINE_string("output_json", None, "Where to write the figures (JSON).")

SUBJECTS = ["a lemon", "the sky", "grass", "snow", "a tomato", "coal", "an orange", "the sea", "milk", "rust"]
ASPECTS = ["colour", "taste", "smell", "size", "weight"]
PIPELINE = """
import json, sys, time
import fastgen_jax
engine = json.loads(sys.argv[2])
pipe = fastgen_jax.pipeline(sys.argv[1], progress=False, **engine)
prompts = [json.loads(line)["body"]["prompt"] for line in open(sys.argv[3])]
start = time.perf_counter()
out = pipe(prompts, progress=False, max_new_tokens=int(sys.argv[4]), ignore_eos=True)
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "texts": [r.generated_text for r in out],
           "prompt_tokens": sum(r.prompt_length for r in out),
           "generated_tokens": sum(r.generated_length for r in out)}, open(sys.argv[5], "w"))
"""


def write_requests(path: str) -> None:
    with open(path, "w") as f:
        for i in range(FLAGS.num_requests):
            prompt = f"Fact {i}: the {ASPECTS[i % 5]} of {SUBJECTS[(i // 5) % 10]} is"
            body = {"prompt": prompt, "max_tokens": FLAGS.max_tokens, "temperature": 0, "ignore_eos": True}
            f.write(
                json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
            )
            f.write("\n")


def vm_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib / 1024
    except (OSError, StopIteration):
        return None


def watched(command: list[str], progress_file: str | None) -> dict:
    """Runs `command`; peak RSS from wait4, and RSS samples at 25/50/75/100% of `progress_file`."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    samples, stop = {}, threading.Event()

    def sample():
        while not stop.is_set():
            rss = vm_rss_mib(proc.pid)
            if progress_file and rss and os.path.exists(progress_file):
                with open(progress_file, "rb") as f:
                    done = sum(1 for _ in f) / FLAGS.num_requests
                for mark in (0.25, 0.5, 0.75, 1.0):
                    if done >= mark and mark not in samples:
                        samples[mark] = round(rss, 1)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    thread.join()
    if status != 0:
        sys.exit(f"{command[:3]} failed:\n{stderr[-3000:]}")
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "rss_mib_at_progress": samples,
        "stderr": stderr,
    }


def main(argv):
    del argv
    engine = dict(
        token_budget=FLAGS.token_budget, max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len
    )
    work = tempfile.mkdtemp(prefix="bench_batch_")
    requests, results = f"{work}/requests.jsonl", f"{work}/results.jsonl"
    write_requests(requests)
    name = os.path.basename(os.path.normpath(FLAGS.model))
    flags_ = [f"--{k}={v}" for k, v in engine.items()]
    job = watched(
        [sys.executable, "-m", "fastgen_jax.generate", f"--model={FLAGS.model}", *flags_,
         f"--input={requests}", f"--output={results}", "--noprogress", f"--served_model_name={name}"],
        results,
    )  # fmt: skip
    summary = job.pop("stderr").strip().splitlines()[-1]
    m = re.search(r"(\d+) prompt \+ (\d+) generated tokens in ([\d.]+) s", summary)
    batch = {
        "summary": summary,
        "prompt_tokens": int(m[1]),
        "generated_tokens": int(m[2]),
        "seconds": float(m[3]),
    }
    pipe_out = f"{work}/pipeline.json"
    pipe = watched(
        [
            sys.executable,
            "-c",
            PIPELINE,
            FLAGS.model,
            json.dumps(engine),
            requests,
            str(FLAGS.max_tokens),
            pipe_out,
        ],
        None,
    )
    pipe.pop("stderr")
    piped = json.load(open(pipe_out))
    texts = {}
    for line in open(results):
        r = json.loads(line)
        texts[int(r["custom_id"][1:])] = r["response"]["body"]["choices"][0]["text"]
    same = sum(texts[i] == t for i, t in enumerate(piped["texts"]))
    figures = {
        "command": " ".join(sys.argv),
        "workload": f"{FLAGS.num_requests} completions, prompts 8-12 tokens, {FLAGS.max_tokens} tokens each",
        "engine": engine,
        "batch_job": {
            **batch,
            **job,
            "generated_tok_s": round(batch["generated_tokens"] / batch["seconds"], 1),
        },
        "pipeline": {
            "seconds": round(piped["seconds"], 1),
            "prompt_tokens": piped["prompt_tokens"],
            "generated_tokens": piped["generated_tokens"],
            "generated_tok_s": round(piped["generated_tokens"] / piped["seconds"], 1),
            **pipe,
        },
        "identical_texts": f"{same} of {FLAGS.num_requests}",
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(figures, indent=1))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(figures, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    app.run(main)
