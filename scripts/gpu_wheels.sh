#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels gpu_suite.sh needs on the GPU image (Python
# 3.12, no internet), into gpu_wheels/ (git-ignored; carry it with the device call).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu_wheels && mkdir gpu_wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d gpu_wheels \
  fastapi uvicorn starlette pydantic pydantic-core annotated-types typing-inspection gguf
ls gpu_wheels
