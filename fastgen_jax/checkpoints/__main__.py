"""Produce a converted checkpoint:

python -m fastgen_jax.checkpoints fetch <model>        # a known model (see KNOWN_MODELS); on a CPU
                                                       # it also builds the C++ kernels
python -m fastgen_jax.checkpoints random <shape>       # random weights of a named shape, e.g.
    --tokenizer_from=checkpoints/smollm2-135m-instruct  # llama2-7b, for GPU benchmarks
"""

from __future__ import annotations

from fastgen_jax.checkpoints.common import CheckpointError
from fastgen_jax.checkpoints.download import KNOWN_MODELS, fetch


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

    from fastgen_jax.checkpoints.random_model import ALL_SHAPES

    usage = (
        "usage: python -m fastgen_jax.checkpoints fetch <model>  (models: " + ", ".join(KNOWN_MODELS) + ")\n"
        "       python -m fastgen_jax.checkpoints random <shape>  (shapes: " + ", ".join(ALL_SHAPES) + ")"
    )
    if len(argv) != 3 or argv[1] not in ("fetch", "random"):
        raise SystemExit(usage)
    try:
        out = fetch(argv[2], flags.FLAGS.checkpoint_dir) if argv[1] == "fetch" else make_random(argv[2])
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{argv[2]} is ready at {out}")
    if argv[1] == "fetch":  # the README's set-up: leave this machine ready to serve it
        from fastgen_jax.attention import build_cpu_kernels

        print(build_cpu_kernels())


def make_random(shape: str) -> str:
    import os

    from absl import flags

    from fastgen_jax.checkpoints.random_model import ALL_SHAPES, make_random_checkpoint
    from fastgen_jax.tokenizer import Tokenizer

    if shape not in ALL_SHAPES:
        raise CheckpointError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")
    source = flags.FLAGS.tokenizer_from
    if not os.path.isdir(source):
        raise CheckpointError(f"--tokenizer_from={source} is not a model directory (fetch one first)")
    out = os.path.join(flags.FLAGS.checkpoint_dir, f"{shape}-random")
    make_random_checkpoint(out, Tokenizer.from_hf_dir(source), shape, dtype=flags.FLAGS.random_dtype)
    return out


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint_dir", "checkpoints", "Where converted checkpoints are written.")
    flags.DEFINE_string(
        "tokenizer_from", "checkpoints/smollm2-135m-instruct", "random: the model dir whose tokenizer to use."
    )
    flags.DEFINE_enum("random_dtype", "bfloat16", ["float32", "bfloat16"], "random: weight dtype on disk.")
    app.run(main)
