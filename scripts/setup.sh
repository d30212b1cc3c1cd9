#!/usr/bin/env bash
# Create .venv (or $VENV) and install finger-reward with every extra, the same way every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch and torchvision must be a matching pair (transformers' Qwen2-VL video processor
# imports torchvision); install them first so the project's dependencies keep them.
case "$(uname -m)" in
  aarch64|arm64) "${pip[@]}" "torch==2.9.1" "torchvision==0.24.1" ;;
  *)             "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" ;;
esac
"${pip[@]}" -e ".[all]"
