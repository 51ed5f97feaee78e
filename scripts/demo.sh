#!/usr/bin/env bash
# The whole study end to end on this machine, set-up included: `bash scripts/demo.sh [actdb demo options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec .venv/bin/actdb --home "${ACTDB_HOME:-actdb-demo}" demo "$@"
