#!/usr/bin/env bash
# Wheels for scripts/device-check.sh, made here (network) for the GPU machine (none): deepspeed and
# what it needs that the GPU image lacks, and the transformers this project is tested with
# (runtime/versions.py), for that machine's python (3.12, x86-64). From a fresh clone: it needs
# only a python3 with pip and network, no .venv and no torch (deepspeed is built without its ops,
# which AutoTP does not use, in pip's isolated build environment).
# They go to .whl/, which git ignores; carry .whl with the working tree:
#   bash scripts/device-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null || { echo "device-wheels: $PY has no pip" >&2; exit 2; }
rm -rf .whl && mkdir -p .whl
# deepspeed ships as a source archive: a pure-Python wheel (DS_BUILD_OPS=0)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 transformers==5.24.0   # transformers: the version this project is tested with
ls -la .whl
