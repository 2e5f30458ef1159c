#!/usr/bin/env bash
# Install what tests/test_comfyui.py needs to start a real ComfyUI server, into the active Python environment:
# ComfyUI's own requirements (read from the vendored snapshot in shared/vendor/comfyui/) without torch, torchvision,
# torchaudio and the optional extras, constrained by this project's requirements.txt so nothing it pins (torch,
# transformers, numpy, ...) moves; plus `requests`, which ComfyUI imports but does not list.
#
# torchvision is deliberately left out: the registry's wheel is a CUDA build that fails to load beside the CPU torch
# (and would break transformers' and diffusers' optional imports for the whole suite). The test puts an importable
# stand-in on the server's PYTHONPATH instead (see the vendor README).
#
# Never fails the CI run: where the snapshot is missing or an install fails (offline), it says so and exits 0, and
# the test skips with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
shared="${EASYANIMATE_SHARED:-../shared}"
snapshot=$(ls "$shared"/vendor/comfyui/ComfyUI-*.tar.gz 2>/dev/null | sort | tail -n 1)
if [ -z "$snapshot" ]; then
  echo "WARNING: no ComfyUI snapshot under $shared/vendor/comfyui; the ComfyUI test will be skipped"
  exit 0
fi
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
left_out='torch|torchvision|torchaudio|comfyui-workflow-templates|comfyui-embedded-docs|alembic|SQLAlchemy'
# Stop at the optional block ("#non essential dependencies") and drop what must not or need not be installed.
tar -xzOf "$snapshot" ComfyUI/requirements.txt \
  | sed -n '/^#non essential/q;p' \
  | grep -vE "^($left_out)([^A-Za-z0-9_-]|\$)" \
  | grep -vE '^[[:space:]]*(#|$)' > "$requirements"
echo requests >> "$requirements"
if ! pip install -q -c requirements.txt -r "$requirements"; then
  echo "WARNING: could not install ComfyUI's requirements; the ComfyUI test will be skipped"
fi
exit 0
