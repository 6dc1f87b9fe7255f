"""Model families. Importing a family module registers its variants with timm."""
from . import resnet_pf
from . import vit_pf
from . import pit_pf
from . import parameternet
from . import replace
from . import rba
