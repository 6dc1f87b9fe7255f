"""Block Redundancy (BR) and Redundant Blocks Approximation (RBA) for timm models.

blocks: finding, capturing and replacing blocks; metrics: BR and the other similarities; fit: the RBA
fit, the approximated model and its saved form; probe: the evaluation. The ``rba`` architecture that
rebuilds saved models is :mod:`timm_pf.models.rba`.

From "Detecting and Approximating Redundant Computational Blocks in Neural Networks" (ICLR 2025
submission; also "Foundation Models on a Budget: Approximating Blocks in Large Vision Models"):

* **Block Redundancy** of blocks ``i`` and ``j`` is the negative mean squared error between the
  representations the model produces after block ``i`` and after block ``j`` on a data subset (Sec. 3).
* **RBA** replaces blocks ``i+1 .. j`` by one linear map ``T`` fitted in closed form (least squares)
  from block ``i``'s output to block ``j``'s output, with no training (Sec. 3). As in the authors'
  code, one shared ``D x D`` matrix without bias is fitted on all tokens of all images; bias, ridge
  regularisation and one map per token position are options.

Blocks are found through timm's ``feature_info``: every feature module that is, holds (``.blocks``) or
sits in an ``nn.Sequential`` of blocks contributes that sequence (ViT/DeiT ``blocks``, PiT
``transformers.k.blocks``, ResNet ``layer1..4``, ConvNeXt/Swin ``stages.k.blocks``, and our max-pool ViT/PiT,
whose blocks run on NHWC grids). Each block's output
is captured with a forward hook while ``forward_features`` runs, stopping after the last block needed:
``forward_intermediates`` returns one tensor per *stage* on hierarchical models (ResNet, PiT), not per
block, and on ViTs the hooked outputs equal its per-block outputs (``norm=False``).

Every token (or pixel, for convolutional feature maps) is one row ``x`` of ``D`` features. Everything is
computed from running sums over a data loader, so memory does not grow with the number of images:

* BR and cosine: per block pair, sums of ``||x_i - x_j||^2`` and of ``cos(x_i, x_j)`` over rows (exact).
* linear CKA (Kornblith et al., 2019) over rows needs the centred cross-covariances ``X_i^T X_j``: one
  ``(kD) x (kD)`` float64 Gram matrix of the ``k`` same-shaped blocks stacked, plus column sums
  (exact; ``8 (kD)^2`` bytes: 170 MB for ViT-S, 680 MB for ViT-B; leave ``cka``/``linear_r2`` out of
  ``metrics`` to skip it).
* ``linear_r2``: the R^2 of the least-squares map from block ``i`` to block ``j`` on the analysis data,
  i.e. how well RBA itself would fit there, from the same Gram matrix. Unlike BR it is invariant to
  invertible linear changes of the representation, the weakness of BR the reviewers pointed out.
* The RBA fit accumulates ``X^T X`` and ``X^T Y`` in float64 and solves on the CPU in float64
  (SVD-based least squares, minimum-norm if ``X^T X`` is singular).
"""
from .blocks import (
    BlockRef, LinearBlockApprox, RbaError, collect_block_outputs, find_blocks, install_spans, skip_spans,
)
from .fit import approximate, fit_spans, load_rba, save_rba
from .metrics import METRIC_TITLES, METRICS, RedundancyReport, analyze
from .probe import accuracy, evaluate_models, extract_features, train_linear_probe

__all__ = [
    'RbaError', 'BlockRef', 'LinearBlockApprox', 'RedundancyReport', 'METRICS', 'METRIC_TITLES',
    'find_blocks', 'collect_block_outputs', 'analyze', 'fit_spans', 'approximate', 'skip_spans', 'install_spans',
    'save_rba', 'load_rba', 'extract_features', 'train_linear_probe', 'accuracy', 'evaluate_models',
]
