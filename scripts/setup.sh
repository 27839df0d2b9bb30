#!/usr/bin/env bash
# Create .venv (the project, torch pinned to the CPU build) and .venv-dvc (dvc on its own,
# because dvc's hydra pins antlr4 4.9 while dagster needs 4.13; see README "Two venvs").
# Idempotent: a stamp of the dependency files makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() { grep -v "^WARNING: Location 'file://" || true; }

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# The two venvs install side by side: each is mostly waiting on downloads and unpacking (about 3.5 and 1.5 minutes).
install_project() {
  local project_stamp
  project_stamp=$(stamp_of pyproject.toml constraints.txt scripts/setup.sh)
  if [[ -x .venv/bin/python && -f .venv/.install-stamp && "$(cat .venv/.install-stamp)" == "$project_stamp" ]]; then
    echo "setup: .venv is up to date"
    return
  fi
  echo "setup: installing the project into .venv (torch pinned by constraints.txt; about 3 minutes) ..."
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet torch==2.13.0 2>&1 | quiet_pip
  .venv/bin/pip install --quiet -e ".[test,deploy]" 2>&1 | quiet_pip
  .venv/bin/python -c "import torch, dagster, diffusers, torchmetrics, Augmentor; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$project_stamp" > .venv/.install-stamp
}

install_dvc() {
  local dvc_stamp
  dvc_stamp=$(stamp_of requirements-dvc.txt scripts/setup.sh)
  if [[ -x .venv-dvc/bin/dvc && -f .venv-dvc/.install-stamp && "$(cat .venv-dvc/.install-stamp)" == "$dvc_stamp" ]]; then
    echo "setup: .venv-dvc is up to date"
    return
  fi
  echo "setup: installing dvc into .venv-dvc ..."
  "$PYTHON" -m venv .venv-dvc
  PIP_CONSTRAINT= .venv-dvc/bin/pip install --quiet -r requirements-dvc.txt 2>&1 | quiet_pip
  .venv-dvc/bin/dvc --version
  echo "$dvc_stamp" > .venv-dvc/.install-stamp
}

install_dvc &
dvc_install=$!
install_project
wait "$dvc_install"
