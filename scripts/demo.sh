#!/usr/bin/env bash
# The main job: set up, then serve + fine-tune the default model on examples/ + compare with its base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tunehouse demo "$@"
