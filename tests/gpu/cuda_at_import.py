"""What verl's driver modules do to CUDA when they are imported: ``verl/utils/device.py:61`` (verl 0.9.1) runs
``torch.cuda.is_available()`` at import time, and ``verl.trainer.main_ppo`` imports it at its top level. A standby
driver imports that much and no more."""

import torch

is_cuda_available = torch.cuda.is_available()
device_count = torch.cuda.device_count()
