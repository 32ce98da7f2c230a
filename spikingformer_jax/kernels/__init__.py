"""Sparse-spike products and the LIF backward pass for XLA:CPU (a C++ library through the XLA FFI,
compiled on first use).

Opt in with a model's `spike_kernels=True`; see `products` and `lif` for what runs where and `build` for how the
library is compiled and cached.
"""
from spikingformer_jax.kernels.lif import lif_backward, lif_backward_applies
from spikingformer_jax.kernels.products import (available, conv_general_dilated, dot_general, spike_conv3x3,
                                                 spike_matmul)

__all__ = ['available', 'conv_general_dilated', 'dot_general', 'lif_backward', 'lif_backward_applies',
           'spike_conv3x3', 'spike_matmul']
