"""A Python client in DeepSpeed-MII's shape, over the server's HTTP API.

    client = fastgen_jax.client("http://127.0.0.1:8000")
    for r in client.generate(["Hello!", "Name a colour."], max_new_tokens=32):
        print(r.generated_text, r.finish_reason)
    client.generate("Tell me a story.", max_new_tokens=64,
                    streaming_fn=lambda r: print(r.generated_text, end=""))

Keyword arguments are `SamplingParams` fields (max_new_tokens, temperature, top_p, top_k, seed, stop,
...); greedy decoding is the default, as in the offline pipeline. A list of prompts goes to the server
as one request, so the engine batches them. `streaming_fn` receives each piece of text as it arrives
(one prompt at a time). Errors from the server raise `ClientError` with its status and message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx

_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclasses.dataclass
class Response:
    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str | None


class Client:
    def __init__(
        self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = self._get("/v1/models")["data"][0]["id"]

    def generate(
        self,
        prompts: str | Sequence[str],
        streaming_fn: Callable[[Response], None] | None = None,
        **sampling: Any,
    ) -> list[Response]:
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        body = {"model": self.model, "temperature": 0.0}
        body.update({_OPENAI_NAMES.get(k, k): v for k, v in sampling.items() if k != "logprobs"})
        if streaming_fn is None:
            return self._complete(batch, body)
        return [self._stream(p, body, streaming_fn) for p in batch]

    def _complete(self, prompts: list[str], body: dict[str, Any]) -> list[Response]:
        # logprobs=0 returns each choice's tokens, which gives its exact generated length
        result = self._post("/v1/completions", {**body, "prompt": prompts, "logprobs": 0})
        n = body.get("n", 1)
        if len(prompts) == 1:
            lengths = [result["usage"]["prompt_tokens"]]
        else:
            lengths = [len(self.tokenize(p)) for p in prompts]
        return [
            Response(c["text"], lengths[c["index"] // n], len(c["logprobs"]["tokens"]), c["finish_reason"])
            for c in sorted(result["choices"], key=lambda c: c["index"])
        ]

    def _stream(self, prompt: str, body: dict[str, Any], callback: Callable[[Response], None]) -> Response:
        body = {**body, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
        total = Response("", 0, 0, None)
        with self._http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise _error(r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ClientError(500, chunk["error"]["message"])
                if chunk.get("usage"):
                    total.prompt_length = chunk["usage"]["prompt_tokens"]
                    total.generated_length = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    total.generated_text += choice["text"]
                    total.finish_reason = choice["finish_reason"] or total.finish_reason
                    callback(Response(choice["text"], 0, 0, choice["finish_reason"]))
        return total

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]

    def _get(self, path: str) -> dict[str, Any]:
        r = self._http.get(path)
        if r.status_code != 200:
            raise _error(r)
        return r.json()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._http.post(path, json=body)
        if r.status_code != 200:
            raise _error(r)
        return r.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error(r: httpx.Response) -> ClientError:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text
    return ClientError(r.status_code, message)


def client(url: str = "http://127.0.0.1:8000", api_key: str | None = None) -> Client:
    """Connects to a running `python -m fastgen_jax.serve` (MII's `mii.client` shape)."""
    return Client(url, api_key)
