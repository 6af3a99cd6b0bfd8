import os

import torch

# Without a GPU, run the Triton kernels through Triton's CPU interpreter so CI checks their logic.
# The variable must be set before Triton decorates the kernels (i.e. before moeut.kernels load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The cores are shared among pytest-xdist's workers (scripts/test.sh runs one per core): each worker and
# the commands it starts (through OMP_NUM_THREADS) take their share, so that none oversubscribes.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)
