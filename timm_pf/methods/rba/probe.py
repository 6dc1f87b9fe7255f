"""Evaluation of approximated models: the model's own head and a linear probe on its pre-logits
features (the paper's protocol, Sec. 4)."""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..stats import count_macs, count_params
from .blocks import Batches, RbaError, _device, _iter_images

__all__ = ['extract_features', 'train_linear_probe', 'accuracy', 'evaluate_models']

@torch.no_grad()
def extract_features(
        model: nn.Module,
        batches: Batches,
        max_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre-logits features, logits, labels): the final norm and pooling (class token for ViTs) as
    ``forward_head(..., pre_logits=True)`` gives them, the features the paper's linear probe reads."""
    dev = _device(model, device)
    was_training = model.training
    model.eval()
    feats, logits, labels = [], [], []
    try:
        for x, y in _iter_images(batches, max_images):
            if y is None:
                raise RbaError('evaluation needs labelled batches (images, labels)')
            tokens = model.forward_features(x.to(dev))
            pre = model.forward_head(tokens, pre_logits=True)
            feats.append(pre.float().cpu())
            logits.append(model.forward_head(tokens).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise RbaError('no images to evaluate: the data loader is empty')
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def train_linear_probe(
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: Optional[int] = None,
        weight_decay: float = 1e-4,
        max_iter: int = 200,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS (deterministic).

    The standardisation is folded into the returned layer, which takes raw features.
    """
    num_classes = num_classes or int(labels.max()) + 1
    feats = features.double()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():
        w = weight / std
        probe.weight.copy_(w.float())
        probe.bias.copy_((bias - w @ mean).float())
    return probe


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def evaluate_models(
        models: Dict[str, nn.Module],
        train_batches: Batches,
        val_batches: Batches,
        input_size: Sequence[int],
        num_classes: Optional[int] = None,
        probe_images: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> List[Dict[str, Any]]:
    """Params, MACs and top-1 of each model with its own head and with a linear probe trained on its
    pre-logits features of ``train_batches`` (the paper's protocol, Sec. 4); head accuracy is None when
    the head's classes differ from the data's."""
    rows = []
    for name, model in models.items():
        train_feats, _, train_labels = extract_features(model, train_batches, probe_images, device)
        val_feats, val_logits, val_labels = extract_features(model, val_batches, None, device)
        classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
        probe = train_linear_probe(train_feats, train_labels, classes)
        with torch.no_grad():
            probe_acc = accuracy(probe(val_feats), val_labels)
        rows.append(dict(
            model=name,
            params=count_params(model),
            macs=count_macs(model, input_size),
            head_top1=accuracy(val_logits, val_labels) if val_logits.shape[-1] == classes else None,
            probe_top1=probe_acc,
        ))
    return rows
