#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check embedder tests scripts
.venv/bin/mypy embedder
