"""`python -m fastgen_jax.checkpoints fetch <model>`: produce a converted checkpoint."""

from __future__ import annotations

from fastgen_jax.checkpoints.common import CheckpointError
from fastgen_jax.checkpoints.download import KNOWN_MODELS, fetch


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

    usage = (
        "usage: python -m fastgen_jax.checkpoints fetch <model>  (models: " + ", ".join(KNOWN_MODELS) + ")"
    )
    if len(argv) != 3 or argv[1] != "fetch":
        raise SystemExit(usage)
    try:
        out = fetch(argv[2], flags.FLAGS.checkpoint_dir)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{argv[2]} is ready at {out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint_dir", "checkpoints", "Where converted checkpoints are written.")
    app.run(main)
