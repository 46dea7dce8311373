#!/usr/bin/env bash
# Prepares, on a machine with PyPI access, what gpu_suite.sh needs on the GPU image (Python 3.12, no
# internet, 64 MiB carried a call) in gpu_wheels/ (git-ignored; carry it with the device call):
# - wheels of our dependencies the image lacks (its package list: the device library's KINDS.md),
#   each without its own dependencies (those the image has; its numpy, say, must not be shadowed);
#   gpu_suite.sh installs them with pip --target into a folder of their own, put on PYTHONPATH;
# - SmolLM2-135M-Instruct's config and tokenizer (3.5 MB): its weights' wheel (93 MB) is over a call's
#   limit, so the suite runs random weights of its shape there (scripts/random_hf_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu_wheels && mkdir gpu_wheels
# The versions this project's venv holds (and its tests pass with); llguidance 1.6 (the newest pip
# found without manylinux_2_31) failed 7 of tests/structured's 18 tests.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d gpu_wheels \
  fastapi==0.165.0 uvicorn==0.55.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 llguidance==1.9.1 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 opentelemetry-api==1.45.3
SMOL=checkpoints/smollm2-135m-instruct
[ -f "$SMOL/tokenizer.json" ] || python3 -m fastgen_jax.checkpoints fetch smollm2-135m-instruct
mkdir gpu_wheels/smollm2-135m-instruct
for f in config.json tokenizer.json tokenizer_config.json generation_config.json; do
  [ -f "$SMOL/$f" ] && cp "$SMOL/$f" gpu_wheels/smollm2-135m-instruct/
done
ls gpu_wheels
du -sh gpu_wheels
