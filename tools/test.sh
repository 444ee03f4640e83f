#!/usr/bin/env bash
# Install (tools/setup.sh), then run every notebook (nbdev-test) and the pytest suite. pytest's summary is the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
# two notebooks at a time on two cores, one BLAS thread each: oversubscribed threads make small ops 100x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
nbdev-test --n-workers 2 --timing
python -m pytest tests -q -p no:cacheprovider
