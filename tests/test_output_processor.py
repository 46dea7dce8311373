"""RequestState: text deltas that add up to the decoded text, cut at a stop string, in time linear in
the output (only the held-back tail is kept between tokens)."""

import numpy as np
import pytest

from fastgen_jax.output_processor import RequestState
from fastgen_jax.sampling_params import SamplingParams
from fastgen_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_hf_dir(smollm2_dir)


def run(tokenizer, ids, **params):
    state = RequestState("r", 3, SamplingParams(**params), tokenizer, 10**6, ())
    deltas, unsent = [], []
    for t in ids:
        out = state.add_token(t, 0.0)
        deltas.append(out.new_text)
        unsent.append(len(state._unsent))
        if out.finished:
            return "".join(deltas), out.finish_reason, max(unsent)
    raise AssertionError("never finished")


def test_deltas_add_up_to_the_decoded_text_and_nothing_accumulates(tokenizer):
    ids = tokenizer.encode("the river runs over the stone and the light " * 400)
    text, reason, most_unsent = run(tokenizer, ids, max_new_tokens=len(ids))
    assert (text, reason) == (tokenizer.decode(ids), "length")
    assert most_unsent == 0  # without stop strings nothing is held back


@pytest.mark.parametrize("stop", [["stone and"], ["xyz", "light runs"], ["e r"]])
def test_a_stop_string_cuts_the_text_where_it_first_occurs(tokenizer, stop):
    words = "the river runs over the stone and the light runs over the river " * 50
    ids = tokenizer.encode(words)
    text, reason, most_unsent = run(tokenizer, ids, max_new_tokens=len(ids), stop=stop)
    full = tokenizer.decode(ids)
    cut = min(i for s in stop if (i := full.find(s)) >= 0)
    assert (text, reason) == (full[:cut], "stop")
    longest_token = max(len(tokenizer.decode([t])) for t in ids)
    assert most_unsent <= max(map(len, stop)) - 1 + longest_token


def test_held_back_text_stays_bounded_over_a_long_output(tokenizer):
    ids = np.random.default_rng(0).integers(100, 5000, 5000).tolist()
    _, _, most_unsent = run(tokenizer, ids, max_new_tokens=len(ids), stop=["never appears in it"])
    longest_token = max(len(tokenizer.decode([t])) for t in ids)
    assert most_unsent <= len("never appears in it") - 1 + longest_token
