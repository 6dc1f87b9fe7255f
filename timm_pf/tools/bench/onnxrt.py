"""Timing in ONNX Runtime (``BenchOptions(runtime='onnxruntime')``, needs the ``onnx`` extra).

Each model is exported once per image size with torch's default exporter (``torch.onnx.export``) and a
dynamic batch axis, so one file serves every batch size of the run. Before a setting is timed, ONNX
Runtime's output is checked against PyTorch's on the setting's input (:data:`PARITY_TOLERANCE`). A model
that does not export or does not match is not timed: its row says why, and the rest of the run goes on.
Timing then uses the same interleaved rounds, statistics and reports as the PyTorch path; the sessions do not
spin-wait after a run (ONNX Runtime's default), which would take the cores from the paired model's next run.
ONNX Runtime allocates outside PyTorch, so peak memory is not measured.
"""
import os
import warnings
from typing import Optional

import numpy as np
import torch

from .measure import BenchOptions, _Step, _Subject
from .paper import Setting

__all__ = ['PARITY_TOLERANCE', 'OnnxModelError', 'export_onnx', 'OnnxModel']

PARITY_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| of the logits, absolute and relative to their size


class OnnxModelError(RuntimeError):
    """A model that cannot be timed in ONNX Runtime: it did not export, load or match PyTorch."""


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """``torch.onnx.export`` with the default exporter, input ``input``, output ``logits`` and a dynamic batch."""
    batch = torch.export.Dim('batch', min=1)
    torch.onnx.export(model, (x,), path, input_names=['input'], output_names=['logits'],
                      dynamic_shapes=({0: batch},), verbose=False)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return f'{type(err).__name__}: {message}' if message else type(err).__name__


class OnnxModel:
    """A model exported for one image size and its ONNX Runtime session, or why there is none (``error``)."""

    def __init__(self, subject: _Subject, img_size: int, options: BenchOptions, folder: str):
        import onnxruntime
        self.subject, self.session, self.error = subject, None, ''
        path = os.path.join(folder, f'{subject.name}_{img_size}.onnx')
        example = torch.randn(2, 3, img_size, img_size)  # batch 2: batch 1 would be specialised as a constant
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                export_onnx(subject.eager.eval(), example, path)
        except Exception as err:  # any exporter failure becomes the model's table entry
            self.error = f'export failed: {_root_cause(err)}'
            return
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = options.threads or torch.get_num_threads()
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # no spin-waiting after a run: the interleaved session of the paired model would compete with it
        session_options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        try:
            self.session = onnxruntime.InferenceSession(path, session_options, providers=['CPUExecutionProvider'])
        except Exception as err:  # ONNX Runtime refusing the exported graph is also the model's entry
            self.error = f'ONNX Runtime cannot load the export: {_root_cause(err)}'

    def mismatch(self, x: torch.Tensor) -> str:
        """Why ONNX Runtime's logits for ``x`` differ from PyTorch's ('' when they match)."""
        with torch.no_grad():
            expected = self.subject.eager.eval()(x).numpy()
        (got,) = self.session.run(None, {'input': x.numpy()})
        if got.shape != expected.shape:
            return f'ONNX Runtime output shape {got.shape} differs from PyTorch {expected.shape}'
        diff = float(np.abs(got - expected).max())
        if not diff <= PARITY_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            return f'ONNX Runtime output differs from PyTorch by {diff:.2g} (> {PARITY_TOLERANCE:g})'
        return ''


class _OnnxStep(_Step):
    """One timed ONNX Runtime inference of an exported model."""

    def __init__(self, onnx_model: OnnxModel, setting: Setting, options: BenchOptions):
        super().__init__(onnx_model.subject, setting, options)
        self.onnx_model, self.feed = onnx_model, {'input': self.x.numpy()}

    def __call__(self) -> None:
        self.onnx_model.session.run(None, self.feed)

    def peak_memory(self) -> Optional[int]:
        return None  # ONNX Runtime's arena is outside PyTorch's view


def onnx_step(onnx_model: OnnxModel, setting: Setting, options: BenchOptions) -> _OnnxStep:
    """The timed step of ``onnx_model`` in ``setting``; raises :class:`OnnxModelError` with the reason when
    the export failed or does not match PyTorch on the setting's input."""
    if onnx_model.error:
        raise OnnxModelError(onnx_model.error)
    step = _OnnxStep(onnx_model, setting, options)
    mismatch = onnx_model.mismatch(step.x)
    if mismatch:
        raise OnnxModelError(mismatch)
    return step
