"""The ``rba`` architecture: a timm model with spans of blocks replaced by linear maps (RBA, see
:mod:`timm_pf.methods.rba`), rebuilt from the ``base_model`` and ``spans`` of its config.json."""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from torch import nn

import timm
from timm.models import load_pretrained, register_model

__all__ = []


@register_model
def rba(pretrained: bool = False, base_model: Optional[str] = None,
        spans: Sequence[Union[Dict[str, Any], Tuple[Union[int, str], Union[int, str]]]] = (),
        **kwargs) -> nn.Module:
    """A timm architecture with spans of blocks replaced by linear maps (RBA).

    ``base_model`` is the timm architecture, ``spans`` the records ``approximate`` writes, or bare
    ``(source, target)`` pairs; other kwargs go to the base model. Weights come from a saved/pushed
    checkpoint (``local-dir:``/``hf-hub:``); without them the maps are identities (the "skip" baseline),
    which has the structure, and so the speed, of the fitted model.
    """
    # the RBA tooling is imported when a model is built: ``import timm_pf`` registers models only
    from ..methods.rba.blocks import RbaError, install_spans
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    cache_dir = kwargs.pop('cache_dir', None)
    kwargs.pop('pretrained_model_args', None)
    if not base_model:
        raise RbaError("the 'rba' architecture needs base_model=<timm architecture> and spans=[...]; make one with "
                       "timm_pf.rba.approximate or load a saved one with timm.create_model('local-dir:<folder>')")
    model = timm.create_model(base_model, **kwargs)
    install_spans(model, base_model, spans)
    if hasattr(pretrained_cfg, 'to_dict'):
        pretrained_cfg = pretrained_cfg.to_dict()
    if isinstance(pretrained_cfg, str):
        raise RbaError(
            f"'rba' has no pretrained tags (got {pretrained_cfg!r}); load saved weights via local-dir:/hf-hub:")
    model.pretrained_cfg.update({k: v for k, v in (pretrained_cfg or {}).items() if v is not None})
    model.pretrained_cfg.update(overlay or {})
    model.pretrained_cfg['architecture'] = 'rba'
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get('in_chans', 3), cache_dir=cache_dir)
    return model
