#!/usr/bin/env bash
# The GPU checks of the Pallas attention kernel, in one command, from any directory:
#   1. the tests marked `gpu`: the kernel compiled through Triton (no interpreter) against the
#      reference, and a tiny model and engine running on it;
#   2. scripts/bench_attention.py at Llama-2-7B head shapes, writing
#      docs/benchmarks/attention_<device>.json. Extra arguments go to the benchmark, e.g.
#      `scripts/gpu_kernel_tests.sh --sweep_tiles` to also time a grid of tile sizes.
# Both steps always run; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "no GPU visible to JAX ($("$PYTHON" -c 'import jax; print(jax.devices())'))" >&2
  exit 1
fi
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'

status=0
"$PYTHON" -m pytest -m gpu -q -rs tests/pallas_kernels tests/test_attention_dispatch.py || status=$?
"$PYTHON" scripts/bench_attention.py "$@" || status=$?
exit "$status"
