#!/usr/bin/env bash
# Dynamic SplitFuse, prefill-first and the deadline-aware "sla" policy on the same build: one
# closed-loop sweep per policy (scripts/bench_serving.py starts our server each time), then all drawn
# on the same plots, and sla compared with each FastGen policy in a table.
#
#   bash scripts/compare_policies.sh                 # CPU preset, SmolLM2 (under 30 minutes on 2 cores)
#   POLICIES="splitfuse sla" NAME=cpu_run2 bash scripts/compare_policies.sh --clients=4,8  # a repeat
#   PRESET=gpu MODEL=checkpoints/llama2-7b-random bash scripts/compare_policies.sh
#   bash scripts/compare_policies.sh --clients=1,4   # extra flags go to bench_serving.py
#   POLICIES="splitfuse splitfuse:late sla" bash scripts/compare_policies.sh  # policy:late (or :early)
#       passes --launch_timing=late (early); labelled <policy>_late. Without it, auto: late under sla,
#       early under the others
#
# CPU preset: FastGen's workload scaled to a 2-core CPU. Prompts ~ Normal(512, 154) tokens (FastGen:
# 2600), generations ~ Normal(32, 10) (FastGen: 60), clients 1-8 (FastGen: 1-32), 2 measured requests
# per client + 8 per point (FastGen: 4 + 32), token budget 256 (FastGen: 768). SLA scaled to the
# machine: first token within prompt/256 s (FastGen: /512) and 2 tokens/s (FastGen: 2-6).
PYTHON=${PYTHON:-python3}  # the interpreter with fastgen-jax installed (e.g. the venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-checkpoints/smollm2-135m-instruct}
PRESET=${PRESET:-cpu}
OUT=${OUT:-docs/benchmarks}
NAME=${NAME:-$PRESET}
case "$PRESET" in
  cpu)
    ARGS=(--clients=1,2,4,8 --requests_per_client=2 --extra_requests=8
          --prompt_mean=512 --prompt_max=900 --gen_mean=32 --gen_max=64
          --prompt_rate=256 --token_rate=2)
    SERVE=token_budget=256,max_num_seqs=32,max_model_len=1024,kv_pages=2048 ;;
  gpu)
    ARGS=(--clients=1,2,4,8,16,32 --prompt_mean=2600 --prompt_max=4000 --gen_mean=60
          --prompt_rate=512 --token_rate=4)
    SERVE=token_budget=768,max_num_seqs=256,max_model_len=4200,kv_memory_fraction=0.85 ;;
  *) echo "PRESET must be cpu or gpu, got $PRESET" >&2; exit 2 ;;
esac
POLICIES=${POLICIES:-splitfuse prefill_first sla}
files=()
for entry in $POLICIES; do
  policy=${entry%%:*} label=$policy serve=$SERVE
  if [[ "$entry" == *:* ]]; then
    case ${entry#*:} in early|late) ;; *) echo "POLICIES: $entry: after ':' give early or late" >&2; exit 2 ;; esac
    label=${policy}_${entry#*:} serve=$serve,launch_timing=${entry#*:}
  fi
  "$PYTHON" scripts/bench_serving.py --serve_model="$MODEL" --policy="$policy" --label="${NAME}_${label}" \
    --output_dir="$OUT" --noplot --serve_flags="$serve" "${ARGS[@]}" "$@"
  files+=("$OUT/serving_${NAME}_${label}.json")
done
"$PYTHON" scripts/plot_serving.py --prefix="$OUT/serving_${NAME}" "${files[@]}"
summary="$OUT/serving_${NAME}_comparison.md"
: > "$summary"
for other in splitfuse splitfuse_early splitfuse_late prefill_first; do
  if [[ -f "$OUT/serving_${NAME}_sla.json" && -f "$OUT/serving_${NAME}_${other}.json" ]]; then
    "$PYTHON" scripts/summarize_policies.py "$OUT/serving_${NAME}_sla.json" "$OUT/serving_${NAME}_${other}.json" \
      | tee -a "$summary"
    echo | tee -a "$summary"
  fi
done
if [[ -f "$OUT/serving_${NAME}_splitfuse.json" && -f "$OUT/serving_${NAME}_prefill_first.json" ]]; then
  "$PYTHON" scripts/summarize_policies.py "$OUT/serving_${NAME}_splitfuse.json" \
    "$OUT/serving_${NAME}_prefill_first.json" | tee -a "$summary"
fi
