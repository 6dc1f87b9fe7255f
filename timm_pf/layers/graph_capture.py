"""Whether a graph is being recorded, for the eager fast paths that must stay out of recorded graphs, and whether
its image sizes are fixed."""
import torch

from timm.layers import is_exporting

__all__ = ['is_capturing_graph', 'is_static_size']


def is_capturing_graph() -> bool:
    """True under ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` (which ``torch.onnx.export`` runs).

    The eager fast paths choose kernels and layouts from run-time devices, shapes and strides, and some call
    compiled extensions; a recorded graph must keep one form that serves every input, so they are skipped there.
    """
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_exporting()


def is_static_size(height: int, width: int) -> bool:
    """Whether ``height`` and ``width`` are plain ints, not the symbolic sizes of an export (or ONNX trace) with a
    dynamic height or width: graph code that computes with them in Python fixes the traced size. Always true in
    TorchScript."""
    return isinstance(height, int) and isinstance(width, int)
