"""Operators introduced by the papers (parameter-free pooling, deformable pooling, dynamic convolution)."""
