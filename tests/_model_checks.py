"""Checks of timm's model contract shared by the model-family tests."""
import torch
from torch import nn


def assert_grad_checkpointing_keeps_gradients(model: nn.Module, x: torch.Tensor) -> None:
    """``set_grad_checkpointing(True)`` must leave every parameter's gradient unchanged (no dropout in ``model``)."""
    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
