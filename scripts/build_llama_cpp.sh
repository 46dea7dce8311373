#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp source vendored in the llama-cpp-python sdist
# on PyPI, outside the repository, and print the binary's path on the last line of stdout.
#
#   scripts/build_llama_cpp.sh [BUILD_DIR]        # default ~/.cache/fastgen_jax/llama_cpp
#
# Used as the peer engine of `scripts/bench_offline.py --llama_cpp=PATH`. Nothing of llama.cpp is
# committed: the sdist, its source and the build live under BUILD_DIR. Environment: PYTHON (the pip
# to use, default python3), JOBS (parallel compile jobs, default 2), LLAMA_CPP_PYTHON_VERSION (pin a
# release, default the newest sdist). Needs cmake and a C++17 compiler; no network except PyPI.
set -euo pipefail

build_root="${1:-${HOME}/.cache/fastgen_jax/llama_cpp}"
python="${PYTHON:-python3}"
jobs="${JOBS:-2}"
spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==${LLAMA_CPP_PYTHON_VERSION}}"

for tool in cmake tar; do
  command -v "${tool}" >/dev/null || { echo "build_llama_cpp: '${tool}' is not installed" >&2; exit 1; }
done

mkdir -p "${build_root}/sdist"
if ! ls "${build_root}"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  # --no-binary for this package only: with :all:, pip would also build the sdist's build requirements
  # (scikit-build-core, and cmake itself where none is found) from source to read its metadata.
  echo "build_llama_cpp: downloading the ${spec} sdist into ${build_root}/sdist" >&2
  "${python}" -m pip download --no-binary llama-cpp-python --no-deps "${spec}" \
    -d "${build_root}/sdist" >&2
fi
sdist="$(ls -t "${build_root}"/sdist/llama_cpp_python-*.tar.gz | head -n 1)"
src="${build_root}/$(basename "${sdist}" .tar.gz)"
if [[ ! -d "${src}/vendor/llama.cpp" ]]; then
  echo "build_llama_cpp: unpacking ${sdist}" >&2
  tar -xzf "${sdist}" -C "${build_root}"
fi
llama_src="${src}/vendor/llama.cpp"
[[ -f "${llama_src}/CMakeLists.txt" ]] || { echo "build_llama_cpp: no llama.cpp under ${llama_src}" >&2; exit 1; }

build_dir="${src}/build-server"
cmake -S "${llama_src}" -B "${build_dir}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "${build_dir}" --config Release --target llama-server -j "${jobs}" >&2

binary="${build_dir}/bin/llama-server"
[[ -x "${binary}" ]] || { echo "build_llama_cpp: the build produced no ${binary}" >&2; exit 1; }
echo "${binary}"
