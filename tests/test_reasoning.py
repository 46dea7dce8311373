"""The reasoning splitter: whole outputs, and the same outputs cut into pieces at every place."""

import itertools

import pytest

from fastgen_jax.reasoning import (
    REASONING_PARSERS,
    ReasoningSplitter,
    prompt_opens_reasoning,
    resolve_reasoning_parser,
)

QWEN3 = REASONING_PARSERS["qwen3"]

# (output, whether the prompt already opened the block, expected reasoning, expected content)
CASES = [
    ("<think>\nFirst, 2+2.\n</think>\n\nIt is 4.", False, "\nFirst, 2+2.\n", "It is 4."),
    ("\n<think>a</think>b", False, "a", "b"),
    ("Thinking is off: <think> stays.", False, "", "Thinking is off: <think> stays."),
    ("<think>never closed, cut by max_tokens", False, "never closed, cut by max_tokens", ""),
    ("<think>x < y </ z </think", False, "x < y </ z </think", ""),
    ("<thi", False, "", "<thi"),
    ("<b>bold</b>", False, "", "<b>bold</b>"),
    ("  \n", False, "", "  \n"),
    ("<think>done</think>\n\n", False, "done", ""),
    ("<think></think>answer </think> again", False, "", "answer </think> again"),
    ("<think>a <think> b</think>c", False, "a <think> b", "c"),
    ("opened by the template</think>\n\nanswer", True, "opened by the template", "answer"),
    ("no end in sight", True, "no end in sight", ""),
]


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", CASES)
def test_whole_outputs_split_as_specified(text, in_reasoning, reasoning, content):
    assert ReasoningSplitter(QWEN3, in_reasoning).split(text) == (reasoning, content)


def _streamed(text: str, cuts: tuple[int, ...], in_reasoning: bool) -> tuple[list[str], list[str]]:
    splitter = ReasoningSplitter(QWEN3, in_reasoning)
    bounds = [0, *cuts, len(text)]
    pieces = [splitter.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    pieces.append(splitter.finish())
    return [r for r, _ in pieces], [c for _, c in pieces]


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", CASES)
def test_every_way_of_cutting_the_output_streams_the_same_split(text, in_reasoning, reasoning, content):
    """Cut at every one and every two places (a tag split over two or three pieces), and one
    character at a time: the pieces join to the whole output's split."""
    positions = range(1, len(text))
    cuttings = [*itertools.combinations(positions, 1), *itertools.combinations(positions, 2)]
    cuttings.append(tuple(positions))
    for cuts in cuttings:
        reasonings, contents = _streamed(text, cuts, in_reasoning)
        assert ("".join(reasonings), "".join(contents)) == (reasoning, content), cuts


def test_a_tag_split_over_pieces_is_never_shown_in_part():
    splitter = ReasoningSplitter(QWEN3)
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("ink>Let me see") == ("Let me see", "")
    assert splitter.feed(". </th") == (". ", "")
    assert splitter.feed("ink") == ("", "")
    assert splitter.feed(">\n") == ("", "")
    assert splitter.feed("\nAnswer") == ("", "Answer")
    assert splitter.finish() == ("", "")


def test_auto_picks_the_parser_by_model_type():
    assert resolve_reasoning_parser("auto", "qwen3") is QWEN3
    assert resolve_reasoning_parser("auto", "qwen3_moe") is QWEN3
    assert resolve_reasoning_parser("auto", "llama") is None
    assert resolve_reasoning_parser("none", "qwen3") is None
    assert resolve_reasoning_parser("qwen3", "llama") is QWEN3


def test_an_unknown_parser_is_named():
    with pytest.raises(ValueError, match=r"unknown reasoning parser 'r1' \(choose from auto, none, qwen3\)"):
        resolve_reasoning_parser("r1", "qwen3")


def test_a_prompt_ending_in_the_start_tag_opens_reasoning():
    assert prompt_opens_reasoning(QWEN3, "<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning(QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning(QWEN3, "<|im_start|>assistant\n")
