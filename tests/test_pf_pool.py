"""The fast parameter-free max-pool equals nn.MaxPool2d exactly: outputs and gradients, ties included."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_pf.layers import PfMaxPool2d, pf_max_pool2d

SIZES = [(7, 8), (8, 7), (9, 9), (6, 6), (2, 3), (1, 5)]


def _input(kind: str, shape, channels_last: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    if kind == 'relu':  # after ReLU about half the values are 0: ties everywhere
        x = torch.relu(torch.randn(shape, generator=gen))
    else:  # few distinct values: ties between non-zero maxima too
        x = torch.randint(-2, 3, shape, generator=gen).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize('size,stride,channels_last,kind', list(itertools.product(
    SIZES, [1, 2], [False, True], ['relu', 'ints'])))
def test_matches_max_pool2d_forward_and_backward(size, stride, channels_last, kind):
    x = _input(kind, (2, 6, *size), channels_last)
    ours_in = x.clone().requires_grad_()
    ref_in = x.clone().requires_grad_()
    ours = pf_max_pool2d(ours_in, 3, stride)
    ref = nn.MaxPool2d(3, stride, padding=1)(ref_in)
    assert torch.equal(ours, ref)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours_in.grad, ref_in.grad)
    if min(size) > 1:  # a 1-pixel side makes both layouts the same
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert ours.is_contiguous(memory_format=fmt)


def test_nchw_stride1_takes_the_separable_path():
    x = torch.relu(torch.randn(2, 4, 8, 8)).requires_grad_()
    assert 'Separable' in type(pf_max_pool2d(x).grad_fn).__name__
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert 'Separable' not in type(pf_max_pool2d(x_cl).grad_fn).__name__


def test_gradients_accumulate_like_max_pool2d_at_many_way_ties():
    # a constant map: every window ties everywhere, each pixel's gradient sums up to 9 contributions
    x = torch.zeros(1, 3, 6, 5)
    grad = torch.randn(1, 3, 6, 5)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    pf_max_pool2d(ours_in).backward(grad)
    F.max_pool2d(ref_in, 3, 1, 1).backward(grad)
    assert torch.equal(ours_in.grad, ref_in.grad)


@pytest.mark.parametrize('kernel_size,stride', [(5, 1), (5, 2)])
def test_other_kernels(kernel_size, stride):
    x = _input('relu', (2, 3, 11, 10), False).requires_grad_()
    ref_in = x.detach().clone().requires_grad_()
    ours = PfMaxPool2d(kernel_size, stride)(x)
    ref = F.max_pool2d(ref_in, kernel_size, stride, kernel_size // 2)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, ref_in.grad)


def test_non_contiguous_input():
    x = torch.relu(torch.randn(2, 8, 9, 9))[:, ::2]
    assert torch.equal(pf_max_pool2d(x), F.max_pool2d(x, 3, 1, 1))


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match='odd positive kernel_size'):
        PfMaxPool2d(2)


def test_module_has_no_parameters():
    pool = PfMaxPool2d(3, 2)
    assert list(pool.parameters()) == []
    assert 'stride=2' in repr(pool)
