"""Operators introduced by the papers (parameter-free pooling, deformable pooling, dynamic convolution)."""
from .pf_pool import PfMaxPool2d, pf_max_pool2d
