"""llama.cpp's `llama-server` as a peer engine for the offline benchmark (`scripts/bench_offline.py`).

- `write_f32_gguf` rewrites a GGUF file with every tensor dequantized to float32 (with the `gguf`
  package, the same dequantization our GGUF loader uses) and its metadata copied, so llama.cpp runs
  the very weights our engine runs; with `weight_type="Q8_0"` the matrices are then quantized to
  llama.cpp's 8-bit blocks (32 weights per float16 scale), the peer of our `--quantize=int8`;
- `LlamaServer` starts `llama-server` (built by `scripts/build_llama_cpp.sh`) on a free local port,
  waits for it to load, sends token-id prompts to its `/completion` endpoint and stops it.

Nothing here imports jax; llama.cpp itself is never part of this repository.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Header fields the writer produces itself (counts, version, architecture, file type).
_WRITER_OWNED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


def _copy_metadata(reader, writer, file_type) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key in _WRITER_OWNED_KEYS or key == "general.file_type":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub_type = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(file_type)


def write_f32_gguf(src: str | os.PathLike, dst: str | os.PathLike, weight_type: str = "F32") -> pathlib.Path:
    """Writes `src` (any GGUF) to `dst` with all tensors dequantized to float32; returns `dst`.
    `weight_type="Q8_0"` then quantizes every matrix whose rows are whole 32-weight blocks to Q8_0
    (norms and other vectors stay float32), as llama.cpp's own `llama-quantize ... Q8_0` would.

    Tensor names, shapes and order are kept (llama.cpp's own layouts, e.g. its permuted q/k rows),
    and so is every metadata key but the file type, which becomes ALL_F32 (or MOSTLY_Q8_0)."""
    import gguf

    if weight_type not in ("F32", "Q8_0"):
        raise ValueError(f"weight_type must be F32 or Q8_0, got {weight_type!r}")
    q8 = weight_type == "Q8_0"
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    dst = pathlib.Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_metadata(reader, writer, gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        # f32[rows, cols] (numpy order: the reverse of GGUF's dims), whatever the stored type.
        w = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if q8 and w.ndim == 2 and w.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor.name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class LlamaServerConfig:
    binary: str  # path of llama-server
    model: str  # GGUF file
    parallel: int  # slots (-np): as many as requests run at once
    slot_context: int  # tokens of context per slot; -c is parallel x this
    threads: int = 2  # -t and -tb
    batch: int = 512  # -b and -ub: tokens per forward pass, as our token budget
    cache_type: str = "f16"  # -ctk / -ctv: llama.cpp's default KV type
    extra_args: tuple[str, ...] = ()  # appended to the command line as they are
    startup_timeout_s: float = 600.0

    def __post_init__(self):
        if not os.access(self.binary, os.X_OK):
            raise ValueError(f"--llama_cpp: {self.binary} is not an executable llama-server")
        for name in ("parallel", "slot_context", "threads", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"llama-server {name} must be positive, got {getattr(self, name)}")

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            *("-m", self.model, "--host", "127.0.0.1", "--port", str(port)),
            *("-np", str(self.parallel), "-c", str(self.parallel * self.slot_context)),
            *("-t", str(self.threads), "-tb", str(self.threads)),
            *("-b", str(self.batch), "-ub", str(self.batch)),
            *("-ctk", self.cache_type, "-ctv", self.cache_type),
            "--no-webui",
            *self.extra_args,
        ]


class LlamaServer:
    """A running llama-server; a context manager. `complete` sends one greedy token-id request."""

    def __init__(self, config: LlamaServerConfig):
        self.config = config
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        import httpx

        self._proc = subprocess.Popen(
            self.config.command(self.port), stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"llama-server not ready after {self.config.startup_timeout_s} s")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(pathlib.Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def complete(self, prompt: Sequence[int], n_predict: int) -> list[int]:
        """Greedy continuation of a token-id prompt, exactly n_predict tokens (EOS ignored)."""
        import httpx

        body: dict[str, Any] = {
            "prompt": [int(t) for t in prompt],
            "n_predict": n_predict,
            "ignore_eos": True,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
            "stream": False,
        }
        r = httpx.post(f"{self.url}/completion", json=body, timeout=None)
        if r.status_code != 200:
            raise RuntimeError(f"llama-server /completion: HTTP {r.status_code}: {r.text[:500]}")
        return list(r.json()["tokens"])

    def complete_all(self, prompts: Sequence[Sequence[int]], n_predicts: Sequence[int]) -> list[list[int]]:
        """All requests at once (one client thread each), outputs in request order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futures = [pool.submit(self.complete, p, n) for p, n in zip(prompts, n_predicts, strict=True)]
            return [f.result() for f in futures]
