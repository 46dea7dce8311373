"""Specification of `fastgen_jax.tokenizer`.

The reference is Hugging Face transformers on the same files: a real model (SmolLM2-135M-Instruct,
whose GGUF holds a byte-level BPE tokenizer and a chat template) and tiny GGUF files written here
to reach the metadata SmolLM2 does not use (other pre-tokenizers, BOS on, user-defined tokens).
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from fastgen_jax.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from tests.gguf_model import smollm2_gguf_path

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what we'd've done!",
    "code": 'def f(x: int) -> int:\n\tif x > 0:\n\t\treturn x ** 2  # sq\n\treturn {"a": [1]}\n',
    "emoji": "Party 🎉🎉 time 😀, family 👩‍👩‍👧 and flags 🇫🇷!",
    "cjk": "你好，世界！日本語のテキスト。한국어 문장입니다.",
    "whitespace": "  two leading\t\ttabs\n\n\nthree newlines    four spaces \r\n end  ",
    "numbers": "In 2024, pi = 3.14159 and 1e-9 < 0.001; call 555-0100 x12345.",
    "special tokens": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special tokens glued": "a<|im_end|>b <|endoftext|> <file_sep>c<|im_start|>",
    "accents": "Crème brûlée, naïve façade, Ångström, Straße",
    "empty": "",
}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 2 + 2?"}],
    "with system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍 and 中文."},
    ],
    "ends with assistant": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
}


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def saved_dir(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved_tokenizer")
    tokenizer.save(directory)
    return directory


# ---------------------------------------------------------------------- GGUF vs transformers


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_gguf_tokenizer_encodes_like_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_gguf_tokenizer_decodes_like_transformers(tokenizer, hf_tokenizer, text, skip_special_tokens):
    ids = tokenizer.encode(text)
    expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected
    if not skip_special_tokens:
        assert expected == text  # byte-level BPE round-trips any text exactly


def test_smollm2_special_tokens_come_from_the_gguf_metadata(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.token_to_id("no such token") is None


def test_special_token_text_encodes_to_the_single_special_id(tokenizer):
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]


def test_smollm2_encode_adds_no_bos_because_its_gguf_says_add_bos_token_false(tokenizer):
    assert tokenizer.encode("Hi 😀!") == [26843, 40303, 218, 17]
    assert tokenizer.encode("Hi 😀!", add_special_tokens=False) == [26843, 40303, 218, 17]


def test_skip_special_tokens_drops_control_tokens_from_decoded_text(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"


# ---------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_renders_like_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt) == expected


def test_chat_template_of_smollm2_adds_its_default_system_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_chat_gives_the_ids_transformers_tokenizes_the_chat_to(tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["multi-turn"]
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, Mapping) else expected
    assert tokenizer.encode_chat(messages) == list(expected)


# Uses what the environment offers beyond plain Jinja: trim/lstrip of block lines, loop controls,
# the tojson filter with its options, special-token variables, extra keyword variables,
# strftime_now and the {% generation %} tag.
FEATURE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
<{{ message.role }}>{{ message.content | tojson }}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{{ tools | tojson(sort_keys=True) }}{% endif %}
{% generation %}{{ eos_token }}{% endgeneration %}
{% if flag %}flag={{ flag }} {{ strftime_now('%Y') }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

FEATURE_MESSAGES = [
    {"role": "user", "content": 'héllo <b> & "quotes"'},
    {"role": "skip", "content": "never shown"},
    {"role": "assistant", "content": "日本 🎉", "tool_calls": None},
    {"role": "user", "content": "third"},
    {"role": "user", "content": "cut by break"},
]
FEATURE_TOOLS = [{"name": "search", "parameters": {"z": 1, "a": "<x>"}}]


@pytest.mark.parametrize("flag", [None, "on"])
def test_chat_template_environment_matches_transformers(tokenizer, hf_tokenizer, flag):
    kwargs = {"flag": flag} if flag else {}
    expected = hf_tokenizer.apply_chat_template(
        FEATURE_MESSAGES,
        tools=FEATURE_TOOLS,
        chat_template=FEATURE_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    rendered = tokenizer.apply_chat_template(
        FEATURE_MESSAGES, tools=FEATURE_TOOLS, chat_template=FEATURE_TEMPLATE, **kwargs
    )
    assert rendered == expected


def test_chat_template_raise_exception_becomes_tokenizer_error(tokenizer):
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system') }}{% endif %}"
    with pytest.raises(TokenizerError, match="chat template failed: TemplateError: need a system"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


def test_chat_template_syntax_error_becomes_tokenizer_error(tokenizer):
    with pytest.raises(TokenizerError, match="chat template failed: TemplateSyntaxError"):
        tokenizer.apply_chat_template([], chat_template="{% for m in messages %}")


def test_chat_template_cannot_reach_python_internals(tokenizer):
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TokenizerError, match="SecurityError"):
        tokenizer.apply_chat_template([], chat_template=template)


def test_tokenizer_without_chat_template_says_so():
    bare = Tokenizer(BackendTokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    assert bare.chat_template is None
    with pytest.raises(TokenizerError, match="this tokenizer has no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------- save and from_hf_dir


def test_save_writes_the_files_a_hugging_face_directory_has(saved_dir):
    assert sorted(p.name for p in saved_dir.iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")


def test_saved_directory_loads_back_with_identical_behaviour(tokenizer, saved_dir):
    loaded = Tokenizer.from_hf_dir(saved_dir)
    for text in TEXTS.values():
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.special_tokens == tokenizer.special_tokens
    assert loaded.eos_token_ids == tokenizer.eos_token_ids
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.vocab_size == tokenizer.vocab_size


def test_transformers_loads_the_saved_directory_with_identical_ids(tokenizer, saved_dir):
    transformers = pytest.importorskip("transformers")
    hf_saved = transformers.AutoTokenizer.from_pretrained(saved_dir)
    for text in TEXTS.values():
        assert hf_saved.encode(text) == tokenizer.encode(text)
    messages = CONVERSATIONS["with system"]
    expected = hf_saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected


def _copy_dir(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_from_hf_dir_adds_eos_ids_from_generation_config_and_config(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_hf_dir(directory).eos_token_ids == (2, 0, 5)


def test_from_hf_dir_reads_special_tokens_written_as_added_token_dicts(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    _edit_json(directory / "tokenizer_config.json", eos_token=eos)
    assert Tokenizer.from_hf_dir(directory).eos_token_id == 0


def test_from_hf_dir_prefers_chat_template_jinja_like_transformers(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    loaded = Tokenizer.from_hf_dir(directory)
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_from_hf_dir_uses_named_templates_and_tool_use_when_tools_are_given(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    named = [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "{{ tools[0].name }}"},
    ]
    _edit_json(directory / "tokenizer_config.json", chat_template=named)
    loaded = Tokenizer.from_hf_dir(directory)
    assert loaded.apply_chat_template([]) == "plain"
    assert loaded.apply_chat_template([], tools=[{"name": "search"}]) == "search"


def test_from_hf_dir_without_post_processor_adds_bos_when_config_asks(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    _edit_json(directory / "tokenizer.json", post_processor=None)
    _edit_json(directory / "tokenizer_config.json", add_bos_token=True)
    assert Tokenizer.from_hf_dir(directory).encode("Hi") == [1, 26843]


def test_tokenizer_module_imports_neither_transformers_nor_torch():
    loaded = "sorted({'transformers', 'torch'} & sys.modules.keys())"
    code = f"import sys, fastgen_jax.tokenizer; print({loaded})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


# ---------------------------------------------------------------------- errors


def test_missing_directory_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer directory .*nowhere does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")


def test_directory_without_tokenizer_json_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        Tokenizer.from_hf_dir(tmp_path)


def test_corrupt_tokenizer_json_is_a_tokenizer_error(saved_dir, tmp_path):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    (directory / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_hf_dir(directory)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_corrupt_config_json_is_a_tokenizer_error_naming_the_file(saved_dir, tmp_path, name):
    directory = _copy_dir(saved_dir, tmp_path / "model")
    (directory / name).write_text("{not json")
    with pytest.raises(TokenizerError, match=rf"{name}: cannot read JSON"):
        Tokenizer.from_hf_dir(directory)


def test_missing_gguf_file_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing\.gguf: file not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_file_that_is_not_gguf_is_a_tokenizer_error(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"definitely not a gguf file")
    with pytest.raises(TokenizerError, match=r"fake\.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(path)


def test_sentencepiece_gguf_is_unsupported_with_a_clear_message(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is 'llama'; only 'gpt2'"):
        Tokenizer.from_gguf(path)


def test_unknown_gguf_pre_tokenizer_is_unsupported_with_a_clear_message(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "odd.gguf", pre="odd-regex")
    with pytest.raises(TokenizerError, match="pre-tokenizer 'odd-regex' .* is not supported"):
        Tokenizer.from_gguf(path)


# ---------------------------------------------------------------------- tiny GGUF files


def _byte_level_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def write_tokenizer_gguf(
    path: Path, *, model: str = "gpt2", pre: str = "smollm", add_bos: bool = False
) -> Path:
    """A GGUF holding only a tokenizer: two control tokens, a user-defined `<think>`, the 256
    byte tokens and a few merges, chosen so that the pre-tokenizers split digits differently."""
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "3 4", "12 3", "4 5", "Ġ 1"]
    merged = ["Ġt", "he", "Ġthe", "12", "34", "123", "45", "Ġ1"]
    tokens = ["<|end|>", "<|start|>", "<think>", *_byte_level_alphabet(), *merged]
    token_types = [3, 3, 4] + [1] * (256 + len(merged))
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_TEXT = "the 12345 x<think>y\n\n  1234<|end|>"


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_tiny_gguf_tokenizers_match_transformers(tmp_path, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    path = write_tokenizer_gguf(tmp_path / "tiny.gguf", pre=pre, add_bos=add_bos)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_gguf(path)
    assert ours.encode(TINY_TEXT) == hf.encode(TINY_TEXT)
    assert ours.encode(TINY_TEXT)[0] == (1 if add_bos else ours.token_to_id("t"))
    for skip in (False, True):
        ids = ours.encode(TINY_TEXT)
        assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_pre_tokenizers_split_digits_as_their_models_expect(tmp_path):
    def digits(pre: str) -> list[str]:
        tiny = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", pre=pre))
        return [tiny.id_to_token(i) for i in tiny.encode("12345")]

    assert digits("smollm") == ["12", "34", "5"]  # GPT-2 regex: one piece, merged by rank
    assert digits("llama-bpe") == ["123", "45"]  # at most three digits per piece
    assert digits("qwen2") == ["1", "2", "3", "4", "5"]  # one digit per piece


def test_user_defined_gguf_token_is_whole_but_not_special(tmp_path):
    tiny = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tiny.gguf"))
    ids = tiny.encode("x<think>y")
    assert ids == [tiny.token_to_id("x"), 2, tiny.token_to_id("y")]
    assert tiny.decode(ids, skip_special_tokens=True) == "x<think>y"


# ---------------------------------------------------------------------- streaming


def _stream(tokenizer, ids, skip_special_tokens=False) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


def test_detokenizer_holds_back_partial_characters_until_complete(tokenizer):
    assert _stream(tokenizer, tokenizer.encode("Hi 😀!")) == ["Hi", "", " 😀", "!", ""]
    assert _stream(tokenizer, tokenizer.encode("你好")) == ["", "你", "", "好", ""]


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_detokenizer_streams_valid_text_without_replacement_chars(tokenizer, text):
    deltas = _stream(tokenizer, tokenizer.encode(text))
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_detokenizer_flush_returns_an_unfinished_character_as_replacement(tokenizer):
    first_byte_of_emoji = tokenizer.token_to_id("ð")  # 0xF0 in the byte alphabet
    assert _stream(tokenizer, [first_byte_of_emoji]) == ["", "\ufffd"]


class RecordingTokenizer:
    """Decodes with a real tokenizer and records how many ids each call decoded."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=False) -> str:
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizer_decodes_a_bounded_window_not_the_whole_sequence(tokenizer):
    ids = tokenizer.encode("word " * 500)
    recording = RecordingTokenizer(tokenizer)
    deltas = _stream(recording, ids)
    assert "".join(deltas) == "word " * 500
    assert max(recording.window_sizes) == 2


def test_detokenizer_cancels_a_decoder_that_changes_the_first_token():
    # SentencePiece-style: "▁" stands for a space, and the decoder drops it at the start.
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="!"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    metaspace = Tokenizer(backend)
    assert metaspace.decode([0, 1, 2]) == "Hello world!"
    assert _stream(metaspace, [0, 1, 2]) == ["Hello", " world", "!", ""]


@pytest.fixture(scope="module")
def id_pool(tokenizer: Tokenizer) -> list[int]:
    """Ids that stress streaming: specials, single-byte tokens (including UTF-8 lead and
    continuation bytes), and the tokens of multi-byte emoji and CJK text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # SmolLM2 lacks a token for a few bytes (0xC0, 0xF5..0xFF, some ASCII controls).
    byte_ids = [tokenizer.token_to_id(c) for c in bytes_to_unicode().values()]
    byte_ids = [i for i in byte_ids if i is not None]
    text_ids = tokenizer.encode("😀🎉👩‍👩‍👧 你好世界 日本語 한국어 é ü <|im_end|> abc\n")
    return sorted({0, 1, 2, *byte_ids, *text_ids})


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_detokenizer_deltas_add_up_to_decode(tokenizer, id_pool, data, skip_special_tokens):
    token_id = st.one_of(st.sampled_from(id_pool), st.integers(0, tokenizer.vocab_size - 1))
    ids = data.draw(st.lists(token_id, max_size=40))
    deltas = _stream(tokenizer, ids, skip_special_tokens)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
