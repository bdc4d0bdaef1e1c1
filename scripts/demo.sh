#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on a real model: pack all-MiniLM-L6-v2, load it with
# every backend, check it bit for bit, rebuild BertModel from it and compare embeddings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
