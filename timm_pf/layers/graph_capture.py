"""Whether a graph is being recorded, for the eager fast paths that must stay out of recorded graphs."""
import torch

from timm.layers import is_exporting

__all__ = ['is_capturing_graph']


def is_capturing_graph() -> bool:
    """True under ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` (which ``torch.onnx.export`` runs).

    The eager fast paths choose kernels and layouts from run-time devices, shapes and strides, and some call
    compiled extensions; a recorded graph must keep one form that serves every input, so they are skipped there.
    """
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_exporting()
