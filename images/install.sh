#!/bin/sh
# Shared by images/Dockerfile and images/Dockerfile.cpu (builder stages only).
#
#   install.sh PYTHON TORCH_INDEX_URL TORCH_VERSION [EXTRAS]
#
# Creates the venv /opt/venv from PYTHON, installs torch==TORCH_VERSION from
# TORCH_INDEX_URL first (the CUDA or CPU build; PyPI's default wheel would be the
# wrong one), then this package from /src with EXTRAS (e.g. "gpu" -> deepspeed).
# A constraint keeps pip from swapping the torch build while it resolves the rest.
set -eu

python="$1"
torch_index_url="$2"
torch_version="$3"
extras="${4:-}"

"$python" -m venv /opt/venv
/opt/venv/bin/python -m pip install --upgrade pip
/opt/venv/bin/python -m pip install --index-url "$torch_index_url" "torch==${torch_version}"

echo "torch==${torch_version}" > /tmp/torch-constraint.txt
if [ -n "$extras" ]; then
    spec="/src[${extras}]"
else
    spec="/src"
fi
PIP_CONSTRAINT=/tmp/torch-constraint.txt /opt/venv/bin/python -m pip install "$spec"
rm -f /tmp/torch-constraint.txt

# Fail the build, not the first pipeline run: the components import kfp and rlhf
# (install_kfp_package=False), and the torch build must be the one asked for.
/opt/venv/bin/python - "$torch_version" <<'PY'
import sys

import kfp
import torch

import rlhf
import rlhf.components
import rlhf.pipelines

wanted = sys.argv[1]
if torch.__version__.split("+")[0] != wanted:
    sys.exit(f"torch {torch.__version__} installed, {wanted} wanted")
print(f"torch {torch.__version__}, kfp {kfp.__version__}, rlhf from {rlhf.__file__}")
PY
/opt/venv/bin/rlhf --help > /dev/null
