#!/usr/bin/env bash
# The three composer policies on the same arrivals: a synthetic FastGen-shaped trace (Poisson arrivals,
# prompts ~ Normal(512, 154), generations ~ Normal(32, 10)) replayed open loop against a server started
# with each policy, then SLA attainment per policy from the same arrivals.
#
#   bash scripts/compare_policies_trace.sh                      # 32 requests at 0.1/s (CPU preset SLA)
#   N=16 RATE=0.06 bash scripts/compare_policies_trace.sh       # smaller, for a loaded machine
PYTHON=${PYTHON:-python3}  # the interpreter with fastgen-jax installed (e.g. the venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-checkpoints/smollm2-135m-instruct}
OUT=${OUT:-docs/benchmarks}
N=${N:-32}
RATE=${RATE:-0.1}
NAME=${NAME:-trace_cpu}
PROMPT_RATE=${PROMPT_RATE:-256}  # the SLA of the CPU preset; scale both down on a loaded machine
TOKEN_RATE=${TOKEN_RATE:-2}
POLICIES=${POLICIES:-splitfuse prefill_first sla}
TRACE="$OUT/${NAME}.jsonl"
"$PYTHON" -m fastgen_jax.benchmarks.trace --fastgen_shaped="$N" --rate="$RATE" "$TRACE"
for entry in $POLICIES; do  # policy:late or policy:early sets --launch_timing (as compare_policies.sh)
  policy=${entry%%:*} label=$policy serve=token_budget=256,max_num_seqs=32,max_model_len=1024,kv_pages=2048
  if [[ "$entry" == *:* ]]; then
    case ${entry#*:} in early|late) ;; *) echo "POLICIES: $entry: after ':' give early or late" >&2; exit 2 ;; esac
    label=${policy}_${entry#*:} serve=$serve,launch_timing=${entry#*:}
  fi
  "$PYTHON" scripts/bench_serving.py --serve_model="$MODEL" --policy="$policy" --label="${NAME}_${label}" \
    --output_dir="$OUT" --noplot --trace="$TRACE" --prompt_rate="$PROMPT_RATE" --token_rate="$TOKEN_RATE" \
    --serve_flags="$serve" "$@"
done
"$PYTHON" scripts/plot_serving.py --prefix="$OUT/serving_${NAME}" "$OUT"/serving_"${NAME}"_*.json
