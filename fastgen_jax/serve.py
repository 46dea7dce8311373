"""The OpenAI-compatible HTTP server.

    python -m fastgen_jax.serve                      # the default model on http://127.0.0.1:8000
    python -m fastgen_jax.serve --model=path/to/model --port=8080 --api_key=secret

Loads the checkpoint, compiles every step program (start-up is the only time anything compiles),
then serves `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/tokenize`, `/detokenize`,
`/health` (liveness), `/ready` (readiness) and `/metrics`. SIGINT or SIGTERM shut it down gracefully
(exit status 0). A forward pass stuck for --step_timeout seconds (a multi-host peer that died) makes
the process exit with status 3, so that its supervisor restarts it. Once it listens it prints
"ready in N s; compiled K programs in M s" (N from the process start).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading
import time

from absl import app, flags, logging

from fastgen_jax import engine_flags, hugepages
from fastgen_jax.reasoning import REASONING_PARSER_CHOICES

# the process's launch (from /proc: a restart with huge pages, `fastgen_jax.hugepages`, keeps it)
_STARTED = hugepages.started()

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the server to the network).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0 picks a free one).")
flags.DEFINE_string("api_key", None, "If set, every request needs 'Authorization: Bearer <key>'.")
flags.DEFINE_float(
    "kv_memory_fraction",
    None,
    "Size each replica's KV pool to this fraction of its devices' memory (host RAM on CPU) minus "
    "the weights.",
)
flags.DEFINE_integer("max_queue", 1024, "Requests allowed to wait beyond --max_num_seqs; more get 429.")
flags.DEFINE_integer("max_request_bytes", 4 << 20, "Largest request body accepted; larger ones get 413.")
flags.DEFINE_float("shutdown_timeout", 30.0, "Seconds in-flight requests may take to finish on shutdown.")
flags.DEFINE_integer(
    "max_seqs_per_request",
    None,
    "Sequences (prompts x n) one request may ask for; more get 400 (default: half of --max_num_seqs).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "max_stream_lag",
    1024,
    "Outputs per sequence a streaming client may leave unread; beyond it the request is aborted and "
    "its KV pages freed.",
    lower_bound=1,
)
flags.DEFINE_float("header_timeout", 10.0, "Seconds a connection may take to send a request's headers.")
flags.DEFINE_float("body_timeout", 30.0, "Seconds a request body may take to arrive after its headers (408).")
flags.DEFINE_float(
    "send_timeout", 60.0, "Seconds a client may read nothing of a response before it is cut off."
)
flags.DEFINE_float(
    "step_timeout",
    300.0,
    "A forward pass running longer is stuck (e.g. a multi-host peer died): the server fails its "
    "requests and exits with status 3 so that it is restarted.",
)
flags.DEFINE_integer(
    "replicas",
    1,
    "Engines behind the server, each on its own --tensor_parallel devices; requests go to the one "
    "with the least outstanding work.",
    lower_bound=1,
)
flags.DEFINE_boolean(
    "cache_aware_routing",
    True,
    "With --replicas > 1: send a request to the replica that already holds the longest cached prefix "
    "of its prompt unless it is busier than the least-loaded one by more than the hit saves; "
    "--nocache_aware_routing balances by outstanding work alone.",
)
flags.DEFINE_enum(
    "reasoning_parser",
    "auto",
    REASONING_PARSER_CHOICES,
    "Split a thinking model's <think>...</think> from its chat answers into message.reasoning_content "
    "(streamed deltas too), as vLLM does; auto: for the families that think (Qwen3, Qwen3-MoE).",
)
flags.DEFINE_string(
    "request_log",
    None,
    "Append one JSON line per finished request (arrival, prompt and output tokens, SLA verdict) to this "
    "file; `python -m fastgen_jax.benchmarks.trace` turns it into a trace to replay.",
)


def _kv_cache_bytes(checkpoint) -> int | None:
    if FLAGS.kv_memory_fraction is None:
        return None  # --kv_cache_gib decides
    if not 0.0 < FLAGS.kv_memory_fraction < 1.0:
        raise ValueError(f"--kv_memory_fraction must be in (0, 1), got {FLAGS.kv_memory_fraction}")
    import jax

    # One replica's share: its --tensor_parallel devices' memory, or on a CPU its part of host RAM.
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        total = stats["bytes_limit"] * FLAGS.tensor_parallel
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // FLAGS.replicas
    if FLAGS.quantize == "int8":  # what the engine will hold, counted without quantizing
        from fastgen_jax.quantize import quantized_nbytes

        weights = quantized_nbytes(checkpoint.params, checkpoint.config.tie_word_embeddings)
    else:
        weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(checkpoint.params))  # no copy to host
    budget = int(total * FLAGS.kv_memory_fraction) - weights
    if budget <= 0:
        raise ValueError(
            f"--kv_memory_fraction={FLAGS.kv_memory_fraction} of {total / 2**30:.1f} GiB does not "
            f"even hold the weights ({weights / 2**30:.2f} GiB)"
        )
    return budget


def build_engines():
    """One warmed-up engine per replica, each on its own group of --tensor_parallel devices."""
    from fastgen_jax.checkpoints import load_checkpoint
    from fastgen_jax.llm_engine import LLMEngine
    from fastgen_jax.parallel import device_groups
    from fastgen_jax.runner import default_dtype, enable_compilation_cache

    enable_compilation_cache()
    groups = device_groups(FLAGS.tensor_parallel, FLAGS.replicas)  # fails fast on too few devices
    dtype = FLAGS.dtype or default_dtype()
    checkpoint = load_checkpoint(FLAGS.model, dtype)
    config = engine_flags.engine_config(_kv_cache_bytes(checkpoint))
    return [LLMEngine(checkpoint, config, dtype, devices=group) for group in groups]


def _configure_logging() -> None:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and jax log a lot at INFO
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    server_log = std_logging.getLogger("fastgen_jax.server")
    server_log.addHandler(handler)
    server_log.setLevel(std_logging.INFO)
    server_log.propagate = False


def _banner(name: str, url: str, engines, sla) -> str:
    """The line that says where the server listens (scripts wait for it: keep " on <url> ")."""
    engine, config = engines[0], engines[0].engine_config
    budget = f"auto up to {config.token_budget}" if config.adaptive_budget else config.token_budget
    return (
        f"fastgen-jax serving {name!r} on {url} (OpenAI API under /v1; max_model_len "
        f"{engine.max_model_len}, token budget {budget}; {len(engines)} replica(s) x "
        f"{config.tensor_parallel} device(s); SLA: first token within prompt/"
        f"{sla.prompt_rate:g} s, {sla.token_rate:g} tokens/s)"
    )


def _readiness(engines) -> str:
    """The ready line, once the engines are: each one's KV pool, zeroed asynchronously beside the
    compiling (the next replica's too), is waited for here, so that the first request after "ready"
    pays nothing of start-up (`LLMEngine.wait_until_ready`)."""
    for engine in engines:
        engine.wait_until_ready()
    programs = sum(e.runner.num_compiled for e in engines)
    seconds = sum(e.runner.compile_seconds for e in engines)
    ready = time.monotonic() - _STARTED
    return f"fastgen-jax: ready in {ready:.1f} s; compiled {programs} programs in {seconds:.1f} s"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _configure_logging()
    from fastgen_jax.checkpoints import CheckpointError
    from fastgen_jax.config import ConfigError
    from fastgen_jax.server.guard import check_api_key
    from fastgen_jax.server.http import bind

    errors = (CheckpointError, ConfigError, ValueError, OSError, OverflowError)
    try:
        sla = engine_flags.sla()
        check_api_key(FLAGS.api_key)
        if _join_process_group():
            return _follow()
        sock = bind(FLAGS.host, FLAGS.port)  # fail fast, before minutes of compiling
        engines = build_engines()
    except errors as e:
        sys.exit(f"error: {e}")
    try:
        _serve(engines, sock, sla)
    finally:
        if not all(_engine_threads_done()):  # stuck in a collective: close() would block as well
            print(
                "fastgen-jax: an engine thread is stuck; exiting without releasing the followers", flush=True
            )
            os._exit(1)
        engines[0].close()  # multi-host: the followers exit too


def _engine_threads_done() -> list[bool]:
    return [not t.is_alive() for t in threading.enumerate() if t.name == "fastgen-engine"]


def _exit_stuck(replica: int) -> None:
    """Called by the watchdog of a replica whose step is stuck: the requests have their errors; give
    the event loop a moment to send them, then exit so that the process is restarted."""
    std_logging.getLogger("fastgen_jax.server").critical(
        "replica %d is stuck; exiting with status 3", replica
    )
    threading.Timer(1.0, os._exit, (3,)).start()


def _join_process_group() -> bool:
    """Multi-host (JAX_COORDINATOR_ADDRESS etc. set): joins; True on a follower process."""
    from fastgen_jax import distributed

    if distributed.launch_from_env() is None:
        return False
    if FLAGS.replicas != 1:
        raise ValueError(
            f"--replicas={FLAGS.replicas}: a multi-host group serves one engine; run one server per "
            "group of hosts behind a load balancer for more"
        )
    distributed.initialize_from_env()
    return not distributed.is_leader()


def _follow() -> None:
    import jax

    [engine] = build_engines()
    print(f"fastgen-jax: process {jax.process_index()} following process 0", flush=True)
    steps = engine.follow()
    print(f"fastgen-jax: process {jax.process_index()} ran {steps} steps; the leader stopped", flush=True)


def _serve(engines, sock, sla) -> None:
    import uvicorn

    from fastgen_jax.server.app import build_app
    from fastgen_jax.server.http import Server, protocol, url_of

    name = engine_flags.served_model_name()
    application = build_app(
        engines,
        name,
        api_key=FLAGS.api_key,
        max_queue=FLAGS.max_queue,
        max_request_bytes=FLAGS.max_request_bytes,
        sla=sla,
        request_log=FLAGS.request_log,
        cache_aware_routing=FLAGS.cache_aware_routing,
        max_seqs_per_request=FLAGS.max_seqs_per_request,
        max_stream_lag=FLAGS.max_stream_lag,
        body_timeout=FLAGS.body_timeout,
        send_timeout=FLAGS.send_timeout,
        step_timeout=FLAGS.step_timeout,
        on_stall=_exit_stuck,
        reasoning_parser=FLAGS.reasoning_parser,
    )
    config = uvicorn.Config(
        application,
        log_level="warning",
        access_log=False,  # the app logs one line per request itself
        timeout_graceful_shutdown=FLAGS.shutdown_timeout,
        http=protocol(FLAGS.header_timeout),
    )
    ready = _readiness(engines)  # last: the KV pools were zeroed while the app was built
    print(_banner(name, url_of(sock), engines, sla), flush=True)
    print(ready, flush=True)
    Server(config).run(sockets=[sock])
    print("fastgen-jax: shut down", flush=True)


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    app.run(main)
