"""`--speculative=ngram` through the server: a request that opts out (`"speculative": false`) gets the
text one that speculates gets, and /metrics counts the draft tokens proposed and accepted."""

import dataclasses

import httpx
import pytest

from tests.server.conftest import SMOLLM2_CONFIG, make_engine, metric, serving

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens and wound the clockwork that turned the beam across the water."
)


@pytest.fixture(scope="module")
def server(smollm2_dir):
    engine = make_engine(smollm2_dir, dataclasses.replace(SMOLLM2_CONFIG, speculative="ngram"))
    # No cost model: whether the warm-up's timings make drafts worth it depends on how busy the
    # machine was then; this test checks what speculation changes and how the metrics count it.
    engine.speculator.step_seconds.clear()
    with serving(engine, model_name="smollm2") as url:
        yield url


def repeat(url, speculative):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}],
        "max_tokens": 48,
        "temperature": 0,
        "speculative": speculative,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_speculation_changes_nothing_but_the_steps_and_metrics_count_it(server):
    plain = repeat(server, speculative=False)
    assert metric(server, "fastgen_spec_decode_num_draft_tokens_total") == 0
    assert repeat(server, speculative=True) == plain
    proposed = metric(server, "fastgen_spec_decode_num_draft_tokens_total")
    accepted = metric(server, "fastgen_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= proposed
    mean = metric(server, "fastgen_spec_decode_mean_accepted_length")
    verifications = metric(server, "fastgen_spec_decode_num_verifications_total")
    assert mean == pytest.approx(accepted / verifications)
