import os

import torch

# Without a GPU, run the Triton kernels through Triton's CPU interpreter so CI checks their logic.
# The variable must be set before Triton decorates the kernels (i.e. before moeut.triton_expert_mm loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
