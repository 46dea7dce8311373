"""SmolLM2 sampled at temperature 1.0 under schemas, choices and a regex: a short run of
`scripts/check_structured.py` (the full run writes docs/benchmarks/structured_smollm2.md)."""

import importlib.util
from pathlib import Path

import pytest

from fastgen_jax.config import EngineConfig
from fastgen_jax.llm_engine import LLMEngine

SCRIPT = Path(__file__).parents[2] / "scripts" / "check_structured.py"


@pytest.mark.slow
def test_smollm2_keeps_to_every_schema_choice_and_regex(smollm2_dir):
    spec = importlib.util.spec_from_file_location("check_structured", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    config = EngineConfig(token_budget=128, max_num_seqs=16, max_model_len=1024, num_pages=200)
    engine = LLMEngine.from_pretrained(str(smollm2_dir), config, "float32", progress=False)
    result = check.run_check(engine, num_json=20, num_choice=6, num_regex=6, max_tokens=200)
    assert result["every_stop_output_valid"], result["groups"]
    assert result["choice_and_regex_all_stop"], result["groups"]
    assert result["json_stop_fraction"] >= 0.9, result["groups"]
    assert result["compiled_after_warmup"] == 0
