# The Triton interpreter must be on before any kernel module is imported: @triton.jit reads TRITON_INTERPRET when a
# kernel is decorated. CPU tests then run the same Triton kernels on CPU tensors; GPU tests compile them as usual.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
