"""timm's ``test_model_load_pretrained`` for the ``*_replace`` variants, run by run.py beside timm's tests.

They have no pretrained tags of their own (so timm's test does not list them): ``pretrained=True`` loads the
timm weights of the plain model, then replaces layers. Not named test_*.py: it needs run.py's test Hub.
"""
import pytest
from timm import create_model

from timm_pf.models.replace import PLAIN_MODELS


@pytest.mark.parametrize('model_name', sorted(PLAIN_MODELS))
def test_model_load_pretrained(model_name):
    """Pretrained weights load with in_chans != 3 and another classifier, as timm's test checks."""
    create_model(model_name, pretrained=True, in_chans=1, num_classes=5)
    create_model(model_name, pretrained=True, in_chans=1, num_classes=0)
