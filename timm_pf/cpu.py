"""Import for CPU training: ``--device-modules timm_pf timm_pf.cpu`` (or ``import timm_pf.cpu``).

It turns on ``torch.set_flush_denormal(True)``: denormal floats, which appear as weights and gradients
shrink during training, are flushed to zero instead of taking the CPU's slow path. The effect on a small
CPU training run is measured in README.md (Training). It changes nothing on GPUs.
"""
import torch

FLUSH_DENORMAL_SUPPORTED = torch.set_flush_denormal(True)
