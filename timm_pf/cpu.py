"""Import for CPU training: ``--device-modules timm_pf timm_pf.cpu`` (or ``import timm_pf.cpu``).

* Turns on ``torch.set_flush_denormal(True)``: denormal floats, which appear as weights and gradients
  shrink during training, are flushed to zero instead of taking the CPU's slow path (the effect on the
  quickstart is measured in README.md, Training). It changes nothing on GPUs.
* Lets ``torchrun`` train on CPUs: timm's ``train.py`` hands ``device_ids=[device]`` to its task's
  ``prepare_distributed``, which DistributedDataParallel refuses for CPU modules; for CPU devices the
  ids are dropped (what DDP expects there), any other call is passed through unchanged.
"""
import functools
from typing import Callable

import torch

torch.set_flush_denormal(True)


def _is_cpu(device) -> bool:
    return torch.device(device).type == 'cpu' if isinstance(device, (str, torch.device)) else False


def _cpu_ddp_compatible(prepare_distributed: Callable) -> Callable:
    @functools.wraps(prepare_distributed)
    def wrapper(self, device_ids=None, **ddp_kwargs):
        if device_ids and all(_is_cpu(d) for d in device_ids):
            device_ids = None
        return prepare_distributed(self, device_ids=device_ids, **ddp_kwargs)
    wrapper.__timm_pf_cpu__ = True
    return wrapper


def _patch_timm_tasks() -> None:
    try:
        from timm.task import TrainingTask
    except ImportError:  # timm versions without tasks build DDP in train.py itself
        return
    classes = [TrainingTask]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        method = cls.__dict__.get('prepare_distributed')
        if method is not None and not getattr(method, '__timm_pf_cpu__', False):
            cls.prepare_distributed = _cpu_ddp_compatible(method)


_patch_timm_tasks()
