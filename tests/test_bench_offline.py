"""scripts/bench_offline.py's --rounds report: medians over rounds, each ratio from its own round.

Run in a subprocess: the script defines absl flags (--model, ...) that other modules define too."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
sys.path.insert(0, "scripts")
import bench_offline as b

def report(ours, hf, llama, fraction, identical):
    results = {name: {"wall_s": 2048 / tps, "gen_tok_s": tps, "total_tok_s": 3 * tps, "steps": 10,
                      "host_s": 0.1, "device_s": 1.0, "preemptions": 0, "loadavg_after": (1.0, 1.0, 1.0)}
               for name, tps in (("fastgen-jax", ours), ("transformers", hf), ("llama.cpp", llama))}
    results["llama.cpp"]["command"] = "llama-server"
    agreement = {"identical_requests": identical, "tokens_before_first_difference": identical}
    return {
        "workload": {"num_requests": 32, "prompt_len_mean": 256, "gen_len_mean": 64, "seed": 7,
                     "prompt_tokens": 5000, "generated_tokens": 2048},
        "config": {"token_budget": 512, "max_num_seqs": 256, "page_size": 16},
        "model": "m", "machine": {"matmul_gflops": 100.0, "bandwidth_gbs": 20.0},
        "results": results,
        "floor": {"flops": 1e9, "compute_s": 1.0, "weight_bytes": 1e9, "memory_s": 1.0, "floor_s": 1.0,
                  "bound": "memory", "fraction_of_floor": fraction},
        "speedup": ours / hf, "speedup_vs_llama_cpp": ours / llama,
        "agreement": agreement, "agreement_llama_cpp": agreement,
        "first_request_first_tokens": {"fastgen-jax": [1, 2]},
    }

# ours / llama.cpp per round: 1.0, 2.0, 1.5 -> round 3 is the median round. The slow spell of round 1
# hit ours alone: its ratios are the low ones, and the medians ignore it.
reports = [report(90, 30, 90, 0.5, 1.0), report(160, 50, 80, 0.8, 0.5), report(150, 37.5, 100, 0.75, 1.0)]
c = b.combine_rounds(reports)
print(json.dumps({"c": c, "table": b.format_table(c)}))
"""


def test_combine_rounds_takes_medians_of_each_rounds_own_ratios():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    c, table = got["c"], got["table"]
    assert c["median_round"] == 2 and c["workload"]["seed"] == 9
    assert c["speedup_vs_llama_cpp"] == 1.5  # of 1.0, 2.0, 1.5
    assert c["speedup"] == 3.2  # of 3.0, 3.2, 4.0: not the ratio of the median throughputs (150 / 37.5)
    assert c["results"]["fastgen-jax"]["gen_tok_s"] == 150
    assert c["results"]["transformers"]["gen_tok_s"] == 37.5
    assert c["results"]["llama.cpp"]["gen_tok_s"] == 90
    assert c["floor"]["fraction_of_floor"] == 0.75
    assert abs(c["agreement"]["identical_requests"] - 2.5 / 3) < 1e-9
    assert [r["seed"] for r in c["rounds"]] == [7, 8, 9]
    assert [r["speedup_vs_llama_cpp"] for r in c["rounds"]] == [1.0, 2.0, 1.5]
    assert "the median of 3 rounds' ratios): 1.50x" in table
    assert "round 3, the median's" in table
    lines = table.splitlines()
    first = lines.index(next(ln for ln in lines if ln.startswith("3 rounds")))
    assert lines[first + 2].split()[:5] == ["1", "7", "90.0", "30.0", "90.0"]
