#!/usr/bin/env bash
# Run the benchmarks on a GPU and write the "GPU" section of BENCHMARKS.md (untried: no GPU was available when this
# was written). Needs an environment whose jax sees the GPU (jax[cuda12]) plus this package's dependencies and qwix.
#
#   bash benchmarks/gpu.sh                # checks + benchmarks (about 10 minutes on one GPU)
#   bash benchmarks/gpu.sh --check-only   # compile + GPU-vs-CPU agreement only (about a minute)
#
# Exit status: 0 when the GPU agrees with the CPU to float32 round-off at matmul precision "highest", 1 when not,
# 2 when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
XLA_PYTHON_CLIENT_PREALLOCATE=false exec "$PYTHON" -m benchmarks.gpu "$@"
