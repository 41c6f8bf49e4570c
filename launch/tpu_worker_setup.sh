#!/usr/bin/env bash
# Run by launch/tpu_vm.sh on every TPU VM worker, from the unpacked t5lite directory: a virtual
# environment with t5lite's runtime requirements and jax's TPU runtime (jax[tpu] of the jax version
# requirements.txt pins). The TPU VM images are Ubuntu 22.04, whose Python 3.10 is too old for jax
# 0.10, so the environment gets its own Python (T5LITE_PYTHON, default 3.11) through uv, which
# downloads one if the machine has none. A slice kept with --keep reuses the environment.
#
#   T5LITE_VENV    where the environment goes (default: ~/t5lite-venv)
#   T5LITE_PYTHON  its Python version (default: 3.11)
set -euo pipefail

venv="${T5LITE_VENV:-$HOME/t5lite-venv}"
python_version="${T5LITE_PYTHON:-3.11}"
jax_version="$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt)"
if [[ -z "$jax_version" ]]; then
  echo "error: requirements.txt pins no jax version (run this from the t5lite directory)" >&2
  exit 2
fi

if [[ ! -x "$venv/bin/python" ]]; then
  uv="$(command -v uv || true)"
  if [[ -z "$uv" ]]; then
    python3 -m pip install -q --user uv
    uv="$(python3 -m site --user-base)/bin/uv"
  fi
  "$uv" venv -q --seed --python "$python_version" "$venv"
fi
"$venv/bin/python" -m pip install -q -r requirements.txt "jax[tpu]==$jax_version"
"$venv/bin/python" -c "import jax, sys; print(f'{sys.executable}: Python {sys.version.split()[0]}, jax {jax.__version__}')"
