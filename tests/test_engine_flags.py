"""The shared engine flags map onto EngineConfig and the SLA: --token_budget=auto is an adaptive
budget of at most --max_token_budget tokens, aimed at --sla_token_rate."""

from absl import flags
from absl.testing import flagsaver

from fastgen_jax import engine_flags
from fastgen_jax.sla import SLA


def parse(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *args])


@flagsaver.flagsaver
def test_auto_budget_is_adaptive_up_to_the_max_budget():
    parse("--token_budget=auto", "--max_token_budget=256", "--sla_token_rate=2")
    config = engine_flags.engine_config(kv_cache_bytes=1 << 20)
    assert (config.token_budget, config.adaptive_budget, config.sla_token_rate) == (256, True, 2.0)
    assert config.token_buckets == (1, 4, 16, 32, 64, 128, 256)  # serving budgets: 1 and 4 too


@flagsaver.flagsaver
def test_a_number_is_a_fixed_budget_and_the_sla_flags_make_the_sla():
    parse("--token_budget=96", "--sla_prompt_rate=256", "--sla_token_rate=6")
    config = engine_flags.engine_config(kv_cache_bytes=1 << 20)
    assert (config.token_budget, config.adaptive_budget) == (96, False)
    assert engine_flags.sla() == SLA(prompt_rate=256.0, token_rate=6.0)


@flagsaver.flagsaver
def test_the_defaults_are_fastgens_sla():
    parse()
    assert engine_flags.sla() == SLA(prompt_rate=512.0, token_rate=4.0)
    assert engine_flags.engine_config(kv_cache_bytes=1 << 20).token_budget == 512


@flagsaver.flagsaver
def test_prefix_caching_is_on_unless_turned_off():
    parse()
    assert engine_flags.engine_config(kv_cache_bytes=1 << 20).enable_prefix_caching
    parse("--noenable_prefix_caching")
    assert not engine_flags.engine_config(kv_cache_bytes=1 << 20).enable_prefix_caching


@flagsaver.flagsaver
def test_overlap_is_on_unless_turned_off():
    parse()
    assert engine_flags.engine_config(kv_cache_bytes=1 << 20).async_scheduling
    parse("--noasync_scheduling")
    assert not engine_flags.engine_config(kv_cache_bytes=1 << 20).async_scheduling
