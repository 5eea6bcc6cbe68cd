"""A job module whose top-level imports touch CUDA the way verl's do (``cuda_at_import``); its body, which runs
only when the job is launched, would allocate on the GPU."""

import torch

from tests.gpu import cuda_at_import  # noqa: F401 - what the standby preloads

if __name__ == "__main__":
    torch.zeros(1, device="cuda")
