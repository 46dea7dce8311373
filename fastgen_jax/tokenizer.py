"""Text to token ids and back: the tokenizer, chat templates and streaming detokenization.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust library) and adds what serving
needs from the model around it: which ids end a sequence, whether encoding prepends BOS, and the
chat template. It comes from one of two places:

- `Tokenizer.from_hf_dir`: a Hugging Face checkpoint directory (tokenizer.json,
  tokenizer_config.json, and generation_config.json / config.json for extra end-of-sequence ids);
- `Tokenizer.from_gguf`: a GGUF file, whose metadata holds a byte-level BPE vocabulary, merges and
  token types, from which we rebuild the tokenizer.

`save` writes the directory form, so a converted checkpoint carries its tokenizer and both we and
transformers' `AutoTokenizer` can read it back.

The reference for every behaviour here is Hugging Face transformers (v5) on the same files: the
same ids, the same decoded text and the same rendered chat. This module never imports it; the tests
compare against it.

`IncrementalDetokenizer` turns generated ids, fed one at a time, into text deltas for streaming.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# The named special tokens, as transformers calls them; a chat template sees each one that is set.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_REPLACEMENT_CHAR = "\ufffd"  # what decoding makes of bytes that are not (yet) valid UTF-8

# Split regexes for byte-level BPE, by `tokenizer.ggml.pre`; None means GPT-2's own regex, which
# `pre_tokenizers.ByteLevel` applies itself. The groups follow transformers' GGUF loader. (llama.cpp
# also splits digits one by one for "smollm", "starcoder" and "refact"; their vocabularies hold no
# multi-digit tokens, so the ids come out the same either way.)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "gpt2": None,
    "smollm": None,
    "starcoder": None,
    "refact": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


# Our special token names -> llama.cpp's, as in the metadata key `tokenizer.ggml.<key>_token_id`.
_GGUF_SPECIAL_TOKEN_KEYS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "unk_token": "unknown",
    "pad_token": "padding",
}


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, saved or applied; the message names the file or template."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat templates of its model.

    Whether `encode` adds BOS (or EOS) is decided by the backend's post-processor, which both
    loaders set from the model's own configuration.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """`special_tokens` maps names in `SPECIAL_TOKEN_NAMES` to token strings; a str
        `chat_template` is the default one, a mapping holds named templates ("default", "tool_use").
        `extra_eos_token_ids` also end generation (e.g. `<|eot_id|>` beside `<|end_of_text|>`)."""
        self._backend = backend
        self._special_tokens = {
            name: token for name, token in (special_tokens or {}).items() if token is not None
        }
        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        self._chat_templates = dict(chat_template or {})
        eos_ids = [self.eos_token_id, *extra_eos_token_ids]
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a Hugging Face tokenizer directory; `TokenizerError` names a missing/bad file."""
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {directory} does not exist")
        backend = _read_backend(directory / "tokenizer.json")
        config = _read_json(directory / "tokenizer_config.json", required=False)
        _add_configured_tokens(backend, config.get("added_tokens_decoder") or {})
        special_tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        if backend.post_processor is None:
            # tokenizer.json's post-processor decides whether BOS is added (as in transformers
            # v5); without one, the config's flag does, as transformers v4 read it.
            backend.post_processor = _bos_eos_processor(
                backend,
                special_tokens["bos_token"] if config.get("add_bos_token") else None,
                special_tokens["eos_token"] if config.get("add_eos_token") else None,
            )
        extra_eos = [
            *_configured_eos_ids(directory / "generation_config.json"),
            *_configured_eos_ids(directory / "config.json"),
        ]
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=_read_chat_templates(directory, config),
            extra_eos_token_ids=extra_eos,
        )

    @classmethod
    def from_gguf(cls, path_or_reader: "str | os.PathLike | gguf.GGUFReader") -> "Tokenizer":
        """Rebuilds the byte-level BPE tokenizer ("gpt2" model) held in a GGUF file's metadata."""
        reader, source = _open_gguf(path_or_reader)
        meta = _GGUFMetadata(reader, source)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) GGUF "
                "tokenizers are supported, convert other models from their Hugging Face directory"
            )
        tokens = meta.require("tokenizer.ggml.tokens")
        token_types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(token_types)} types")
        backend = _byte_level_bpe(tokens, meta.require("tokenizer.ggml.merges"))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"), source)
        _add_gguf_control_tokens(backend, tokens, token_types)
        special_tokens = {
            name: _token_at(tokens, meta.get(f"tokenizer.ggml.{key}_token_id"))
            for name, key in _GGUF_SPECIAL_TOKEN_KEYS.items()
        }
        backend.post_processor = _bos_eos_processor(
            backend,
            special_tokens["bos_token"] if meta.get("tokenizer.ggml.add_bos_token") else None,
            special_tokens["eos_token"] if meta.get("tokenizer.ggml.add_eos_token") else None,
        )
        # llama.cpp also stops at end-of-turn / end-of-message tokens when the file names them.
        end_ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_token_ids=[i for i in end_ids if i is not None],
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json, readable by `from_hf_dir` and by
        transformers' `AutoTokenizer`. Extra end-of-sequence ids belong in the checkpoint's
        generation_config.json / config.json, which the checkpoint writer owns."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        probe = self._backend.encode("", add_special_tokens=True).ids
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            # Informational: tokenizer.json's post-processor is what adds them.
            "add_bos_token": bool(probe) and probe[0] == self.bos_token_id,
            "add_eos_token": bool(probe) and probe[-1] == self.eos_token_id,
            "clean_up_tokenization_spaces": False,
        }
        if set(self._chat_templates) == {"default"}:
            config["chat_template"] = self._chat_templates["default"]
        elif self._chat_templates:
            config["chat_template"] = [
                {"name": name, "template": template} for name, template in self._chat_templates.items()
            ]
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (out / "tokenizer_config.json").write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------ ids and text

    def to_json(self) -> str:
        """The backend as `tokenizer.json` text (what grammar engines build their vocabulary from)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Like transformers v5 for BPE models, no tokenization-space clean-up."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<|im_start|>", ...}."""
        return dict(self._special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_token_id("eos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the EOS token first, then the model config's extras."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_id("pad_token")

    def _special_token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none."""
        return self._chat_templates.get("default")

    @property
    def takes_tools(self) -> bool:
        """Whether the chat templates render a `tools` list (a "tool_use" one, or a default that
        reads `tools`); when not, the server writes tools into the prompt itself."""
        return "tool_use" in self._chat_templates or "tools" in (self.chat_template or "")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders a conversation as the prompt text, as transformers' `apply_chat_template(...,
        tokenize=False)` does. `chat_template` picks a named template or is one; `kwargs` become
        template variables (e.g. `enable_thinking=False`)."""
        source = self._select_chat_template(chat_template, tools)
        prepared = _template_messages(messages)
        variables = {"documents": None, **self._special_tokens, **kwargs}
        try:
            return _compile_chat_template(source).render(
                messages=prepared,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            message = f"chat template failed: {type(error).__name__}: {error}"
            raise TokenizerError(message) from error

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Ids of `apply_chat_template(...)`; adds no BOS, as the template writes any it needs."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _select_chat_template(self, name_or_source: str | None, tools: object) -> str:
        if name_or_source is not None:
            return self._chat_templates.get(name_or_source, name_or_source)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        if self._chat_templates:
            names = ", ".join(sorted(self._chat_templates))
            raise TokenizerError(f"no default chat template; pass chat_template= one of: {names}")
        raise TokenizerError("this tokenizer has no chat template")


class IncrementalDetokenizer:
    """Turns generated ids, fed one at a time, into text deltas for streaming.

    Decoding each id alone goes wrong twice over: a byte-level token can carry part of a UTF-8
    character, and some decoders (SentencePiece's Metaspace) drop the space of whichever token comes
    first. So each step decodes a short window -- the last emitted chunk's ids, then those not yet
    emitted -- and emits what it adds to the chunk's own text; both texts start at the same token,
    so a first-token effect cancels out. The window grows only while its text ends in an
    unfinished character (U+FFFD), which is held back: a step costs O(window), not O(sequence),
    and the deltas add up to `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # the last emitted chunk's ids, then those not yet emitted
        self._num_emitted = 0  # how many of `_window` the emitted text already covers
        self._emitted_text = ""  # decode(_window[:_num_emitted])

    def add(self, token_id: int) -> str:
        """Takes the next id; returns the text it completes ("" while a character is unfinished)."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back, unfinished bytes as U+FFFD."""
        if self._num_emitted == len(self._window):
            return ""
        return self._emit(self._decode(self._window))

    def _emit(self, text: str) -> str:
        delta = text[len(self._emitted_text) :]
        self._window = self._window[self._num_emitted :]
        self._num_emitted = len(self._window)
        self._emitted_text = self._decode(self._window)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


# ---------------------------------------------------------------------- Hugging Face directories


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: cannot read JSON: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for any malformed file
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {error}") from error


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_configured_tokens(backend: tokenizers.Tokenizer, added: Mapping[str, Any]) -> None:
    """Adds tokens that tokenizer_config.json declares but tokenizer.json lacks."""
    for entry in added.values():
        content = entry.get("content")
        if not isinstance(content, str) or backend.token_to_id(content) is not None:
            continue
        token = AddedToken(
            content,
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", False),
            special=entry.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _configured_eos_ids(path: Path) -> list[int]:
    """`eos_token_id` of a generation_config.json or config.json: absent, one id or a list."""
    value = _read_json(path, required=False).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_chat_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates; chat_template.jinja and chat_templates/*.jinja (transformers'
    newer layout) take priority over tokenizer_config.json's entry, as in transformers."""
    templates: dict[str, str] = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((directory / "chat_templates").glob("*.jinja")):
        templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):  # [{"name": ..., "template": ...}, ...]
        return {entry["name"]: entry["template"] for entry in configured}
    return {}


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """Wraps each sequence in `bos`/`eos` (None: not added), as transformers sets it up."""
    bos, eos = (t if t is not None and backend.token_to_id(t) is not None else None for t in (bos, eos))

    def wrap(sequence: str, type_id: int) -> str:
        return " ".join(f"{piece}:{type_id}" for piece in (bos, sequence, eos) if piece is not None)

    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t is not None]
    return processors.TemplateProcessing(
        single=wrap("$A", 0), pair=f"{wrap('$A', 0)} {wrap('$B', 1)}", special_tokens=specials
    )


# ---------------------------------------------------------------------- GGUF files


class _GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: gguf.GGUFReader, source: str) -> None:
        self._reader = reader
        self._source = source

    def get(self, key: str) -> Any:
        field = self._reader.fields.get(key)
        return None if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise TokenizerError(f"{self._source}: GGUF metadata has no {key}")
        return value


def _open_gguf(path_or_reader: "str | os.PathLike | gguf.GGUFReader") -> tuple[Any, str]:
    if isinstance(path_or_reader, gguf.GGUFReader):
        # The reader memory-maps its file; the map knows the path, for error messages.
        return path_or_reader, str(getattr(path_or_reader.data, "filename", None) or "GGUF file")
    path = Path(path_or_reader)
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path), str(path)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path}: not a readable GGUF file: {error}") from error


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map, in which byte-level BPE vocabularies are spelled.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, DEL, NBSP, soft
    hyphen...) move, in byte order, to the code points from U+0100 up, so no token holds a space.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable}
    alphabet.update({b: chr(0x100 + n) for n, b in enumerate(moved)})
    return alphabet


def _in_byte_alphabet(token: str) -> bool:
    return set(token) <= _byte_alphabet_chars()


@lru_cache(maxsize=1)
def _byte_alphabet_chars() -> frozenset[str]:
    return frozenset(_byte_alphabet().values())


def _byte_level_spelling(token: str) -> str:
    """A token as byte-level BPE spells it. Nearly all GGUF tokens already are; one with other
    characters (e.g. a real space) is stored as plain text, so it is spelled out byte by byte."""
    if _in_byte_alphabet(token):
        return token
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str]) -> tokenizers.Tokenizer:
    vocab = {_byte_level_spelling(token): i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_pre_tokenizer(pre: str | None, source: str) -> pre_tokenizers.PreTokenizer:
    """Splits text the way the vocabulary's merges were learned (`tokenizer.ggml.pre`)."""
    if pre is not None and pre not in GGUF_PRE_TOKENIZER_SPLITS:
        supported = ", ".join(sorted(GGUF_PRE_TOKENIZER_SPLITS))
        raise TokenizerError(
            f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {supported}"
        )
    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre)  # a file without the key gets GPT-2's regex
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _add_gguf_control_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    """Makes control tokens (`<|im_start|>`) special added tokens and user-defined ones
    (`<think>`) plain added tokens, so text containing them maps to their single id instead of
    being cut into pieces, as llama.cpp does. One spelled outside the byte alphabet was respelled
    as an ordinary token above, and stays one (transformers does the same)."""
    kinds = {gguf.TokenType.CONTROL: True, gguf.TokenType.USER_DEFINED: False}
    added = [
        AddedToken(token, normalized=False, special=kinds[kind])
        for token, kind in zip(tokens, token_types, strict=True)
        if kind in kinds and _in_byte_alphabet(token)
    ]
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])


def _token_at(tokens: Sequence[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


# ---------------------------------------------------------------------- chat templates


# Where a message's reasoning text may be; templates read the first or "thinking".
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template: keys set to None dropped (OpenAI
    clients send `content=None`, which templates would print), and the reasoning text filled in
    under both names templates read it by."""
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(f"chat messages must be dicts, got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mask assistant text for
    training. Here it only renders its body, so templates that use it still compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own filter sorts keys and escapes <, >, & and ' for HTML; chat templates want the
    # JSON as given. The parameters (and their order) are those templates written for
    # transformers may pass.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in. Templates come with model files,
    so they run sandboxed: no attribute access to internals, no mutation of our objects."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
