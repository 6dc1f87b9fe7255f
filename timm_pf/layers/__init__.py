"""Operators introduced by the papers (parameter-free pooling, deformable pooling, dynamic convolution)."""
from .pf_pool import PfMaxPool2d, pf_max_pool2d
from .dynamic_conv import DynamicConv2d, per_sample_conv2d
from .token_mixers import EfficientTokenMixer, GridAttention, MaxPool2dNhwc, Conv2dNhwc
from .deform_pool import (
    DeformAvgPool2d, DeformMaxPool2d, DeformPool2d, LearnedDeformPool2d, deform_pool2d, sampled_deform_pool2d)
from .cpu_layout import ChannelsLastKernelConv2d, use_channels_last_kernels
