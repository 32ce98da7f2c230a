"""Spikingformer, Spikingformer† (CML) and Spikformer for images and event frames.

The registered sizes and their names are in registry.py (`registry.get_model(name, **overrides)`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikingformer_jax import layers, neurons


class Spikingformer(nn.Module):
  """The vision network: tokenizer, `depth` blocks, mean over tokens and time, linear head.

  Input: images `[B, H, W, C]` (repeated over T: direct encoding) or per-step frames
  `[B, T, H, W, C]` (event cameras). Output: logits `[B, num_classes]`.
  """
  num_classes: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  T: int = 4
  pool: tuple[bool, bool, bool, bool] = (True, True, True, True)
  style: str = 'spikingformer'  # 'spikingformer' | 'cml' | 'spikformer'
  lif: neurons.LIFConfig = neurons.LIFConfig()
  attn_scale: float = 0.125
  qkv_bias: bool = False
  # Which reference code a PyTorch checkpoint of this model comes from: 'imagenet' | 'cifar' | 'dvs'. The
  # converter reads it for Spikformer, whose three codes name and shape the same tensors differently.
  reference_code: str = 'imagenet'
  dtype: Any = jnp.float32
  # Rematerialise the tokenizer and each block, keeping only the products' outputs and their spike
  # inputs (as int8) for the backward pass (layers.REMAT_POLICY).
  remat: bool = False
  # A static image's stem conv and BatchNorm once instead of at each of the T steps (same values).
  stem_once: bool = True
  # Products with a spike operand through the sparse CPU kernels (spikingformer_jax.kernels), and the LIF
  # backward pass in its one-pass kernel: the same parameters and, up to float rounding, the same outputs
  # and gradients; faster on the CPU, ignored elsewhere.
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.time_major_input(x)
    lif = self.lif.replace(cpu_kernel=True) if self.spike_kernels else self.lif
    tokenizer_cls = layers.remat(layers.SpikingTokenizer) if self.remat else layers.SpikingTokenizer
    x = tokenizer_cls(self.embed_dim, self.pool, lif, self.T, self.style, self.dtype,
                      spike_kernels=self.spike_kernels, stem_once=self.stem_once, name='tokenizer')(x, train)
    t, b, h, w, d = x.shape
    x = x.reshape(t, b, h * w, d)
    block_cls = layers.remat(layers.Block) if self.remat else layers.Block
    for i in range(self.depth):
      x = block_cls(self.embed_dim, self.num_heads, self.mlp_ratio, lif,
                    pre_activation=self.style != 'spikformer', attn_scale=self.attn_scale,
                    qkv_bias=self.qkv_bias, dtype=self.dtype, spike_kernels=self.spike_kernels,
                    name=f'block_{i}')(x, train)
    features = x.astype(jnp.float32).mean(axis=(0, 2))  # tokens, then time (both plain means).
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros,
                    name='head')(features)

  def time_major_input(self, x):
    """Frames `[B, T, H, W, C]` -> `[T, B, H, W, C]`; a static image `[B, H, W, C]` stays as it is: the
    tokenizer's stem encodes it directly (the analog image at every step)."""
    if x.ndim not in (4, 5):
      raise ValueError(f'Expected images [B, H, W, C] or frames [B, T, H, W, C], got shape {x.shape}.')
    if x.ndim == 5:
      if x.shape[1] != self.T:
        raise ValueError(f'Frame input has {x.shape[1]} time steps but the model has T={self.T}.')
      x = jnp.swapaxes(x, 0, 1)
    return x.astype(self.dtype)


def per_step_stem(model: nn.Module) -> nn.Module:
  """`model` computing a static image's stem at every time step, as the reference code does.

  Same parameters and outputs; its traced products are those the paper's energy method counts (the
  reference counts conv ops on the [T*B] batch, the stem's T identical copies included).
  """
  return model.clone(stem_once=False) if isinstance(model, Spikingformer) else model


def init_variables(model: nn.Module, rng: jax.Array, example: jax.Array) -> dict:
  """{'params', 'batch_stats'} for `model` (the sown 'spikes' of the init pass are dropped)."""
  variables = model.init(rng, example, train=False)
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}


def abstract_variables(model: nn.Module, example_shape: tuple) -> dict:
  """Shapes/dtypes of `init_variables` without allocating anything."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0),
                                               jnp.zeros(example_shape, jnp.float32)))


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

