"""Flax building blocks of Spikingformer and its baselines, channels-last and time-major.

Shapes: images `[T, B, H, W, C]`, token sequences `[T, B, N, D]`. Convolutions, dense layers and
BatchNorm act on all time steps at once, so BatchNorm statistics are pooled over T, B and
space/tokens exactly as the reference's `flatten(0, 1)` does. Every LIF output is sown into the
'spikes' collection under the reference's module name, for parity tests and firing rates.

Rematerialisation (`REMAT_POLICY`): every product's output is named PRODUCT_OUT and every spike
operand of a product SPIKE_OPERAND, kept as int8 (spikes are 0/1; Spikformer's residual stream holds
small integer counts). A model remats with the policy that saves only these and BatchNorm's
per-channel statistics: the backward pass then holds one activation per product in the compute dtype
plus its spike input in one byte, and recomputes BatchNorm, LIF and max-pooling from them in
elementwise passes.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from spikingformer_jax import batchnorm, kernels, neurons, pooling, sharding

Dtype = Any
SPIKES = 'spikes'
PRODUCT_OUT = 'product_out'
SPIKE_OPERAND = 'spike_operand'
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(PRODUCT_OUT, SPIKE_OPERAND, batchnorm.STATISTICS)


@jax.custom_jvp
def spike_operand(x):
  """x (0/1 spikes or small integer counts) through an int8 copy named SPIKE_OPERAND: what remat keeps.

  Exact for integers in [-128, 127], and the identity for gradients; outside a rematerialised model
  the two casts fuse into x's producer.
  """
  return checkpoint_name(x.astype(jnp.int8), SPIKE_OPERAND).astype(x.dtype)


@spike_operand.defjvp
def _spike_operand_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return checkpoint_name(x.astype(jnp.int8), SPIKE_OPERAND).astype(x.dtype), x_dot


def product_out(y):
  return checkpoint_name(y, PRODUCT_OUT)


def remat(module_cls):
  """`module_cls` (called as `(x, train, ...)`) rematerialised with REMAT_POLICY."""
  return nn.remat(module_cls, static_argnums=(2,), policy=REMAT_POLICY)


def torch_uniform_init(fan_in_axes: Sequence[int] = (-2,)):
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform a=sqrt(5)).

  The same bound is PyTorch's default bias init, where fan_in comes from the weight; `bias_init`
  below takes it explicitly because Flax initialises biases without seeing the kernel.
  """
  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """HWIO kernel: fan_in = kh * kw * in."""
  return torch_uniform_init(fan_in_axes=(0, 1, 2))(key, shape, dtype)


def bias_init(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def batch_norm(train: bool, dtype: Dtype, name: str) -> batchnorm.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), float32 statistics and params."""
  return batchnorm.BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class ChannelDense(nn.Module):
  """A 1x1 convolution on channels-last data (the reference's Conv1d/Conv2d with kernel size 1).

  Its input is spikes or small integer counts (`spike_operand`).

  spike_kernels: the product goes through `kernels.dot_general` (sparse on the CPU; same parameters), which reads
  the spike operand as int8.
  """
  features: int
  use_bias: bool
  dtype: Dtype = jnp.float32
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    y = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=torch_uniform_init((0,)), bias_init=bias_init(fan_in),
                 dot_general=functools.partial(kernels.dot_general, integer_lhs=True) if self.spike_kernels else None,
                 name='dense')(spike_operand(x))
    return product_out(sharding.keep_batch_split(y, 1))  # [T, B, N, D]


class LIF(nn.Module):
  """A multi-step LIF over the leading time axis; records its spikes in the 'spikes' collection."""
  config: neurons.LIFConfig

  @nn.compact
  def __call__(self, x):
    s = neurons.lif(x, self.config)
    self.sow(SPIKES, 'out', s)
    return s


def _time_fold(fn, x):
  """Applies `fn` to `[B*T, ...]` and restores `[T, B, ...]`.

  The batch is the major half of the folded axis: a batch split over devices stays split (each device
  holds whole examples), so a data-parallel step runs the convolutions on its own examples. Folding
  time-major would interleave the devices' examples and make the partitioner gather the batch.
  """
  y = fn(sharding.keep_batch_split(einops.rearrange(x, 't b ... -> (b t) ...'), 0))
  y = einops.rearrange(sharding.keep_batch_split(y, 0), '(b t) ... -> t b ...', t=x.shape[0])
  return sharding.pin_batch(y, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def repeat_over_time(x, T: int):
  """x `[B, ...]` repeated T times on a new leading axis `[T, B, ...]` (`broadcast_to`), whose gradient sums
  the T cotangents in T - 1 elementwise adds.

  The gradient of `broadcast_to` is a `reduce_sum` over the leading axis, which XLA:CPU hands to YNNPACK:
  26 ms for the CIFAR stem's `[4, 32, 32, 32, 32]` on this project's CPU machine, the adds 1 ms
  (benchmarks/README.md, `cifar_cpu_step.py`).
  """
  return jnp.broadcast_to(x[None], (T,) + x.shape)


def _repeat_over_time_fwd(x, T):
  return repeat_over_time(x, T), None


def _repeat_over_time_bwd(T, _, g):
  return (functools.reduce(jnp.add, [g[t] for t in range(T)]),)


repeat_over_time.defvjp(_repeat_over_time_fwd, _repeat_over_time_bwd)


def max_pool(x, scatter_free: bool = False):
  """MaxPool2d(kernel 3, stride 2, padding 1) on `[T, B, H, W, C]` (padding never wins: -inf).

  scatter_free: the backward pass of `pooling.max_pool_3x3_s2` (same values and gradients; faster on the CPU).
  """
  if scatter_free:
    return _time_fold(pooling.max_pool_3x3_s2, x)
  return _time_fold(lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), x)


class ConvBN(nn.Module):
  """3x3 stride-1 conv (no bias) then BatchNorm, on `[T, B, H, W, C]` (or `[B, H, W, C]`, see `repeats`).

  spike_input: the input is spikes or small integer counts (`spike_operand`); False for the image.
  spike_kernels: the conv goes through `kernels.conv_general_dilated` (sparse on the CPU; same parameters), which
  reads a spike input as int8.
  """
  features: int
  dtype: Dtype = jnp.float32
  spike_input: bool = True
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x, train: bool, repeats: int = 1):
    """`repeats`: a `[B, H, W, C]` x stands for that many identical time steps (BatchNorm counts them)."""
    conv = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                   conv_general_dilated=(functools.partial(kernels.conv_general_dilated, integer_lhs=self.spike_input)
                                         if self.spike_kernels else None),
                   name='conv')
    x = spike_operand(x) if self.spike_input else x
    x = product_out(sharding.keep_batch_split(conv(x), 0) if x.ndim == 4 else _time_fold(conv, x))
    return batch_norm(train, self.dtype, 'bn')(x, repeats=repeats)


class SpikingTokenizer(nn.Module):
  """The conv stem. Channel plan D/8, D/4, D/2, D, D; `pool` says which of stages 1..4 halve the size.

  style='spikingformer': stage 0 Conv-BN; stage k>=1 LIF -> [MaxPool] -> Conv-BN (float output).
  style='cml' (Spikingformer†): the max-pool moves after the BN of the previous stage.
  style='spikformer' (SPS): stages 0..3 Conv-BN-LIF -> [MaxPool]; then RPE Conv-BN-LIF added to
  the features, so the output is an integer-valued sum of spikes.
  spike_kernels: the CPU path: stages 1..4, whose inputs are spikes, use the sparse CPU kernels (stage 0 reads
  the image), max-pooling the backward pass of `pooling.max_pool_3x3_s2`, and a static image's stage-0 output
  is repeated over T by `repeat_over_time`.
  """
  embed_dim: int
  pool: tuple[bool, bool, bool, bool]
  lif: neurons.LIFConfig
  T: int
  style: str = 'spikingformer'
  dtype: Dtype = jnp.float32
  spike_kernels: bool = False
  stem_once: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    """x: frames `[T, B, H, W, C]`, or a static image `[B, H, W, C]` (direct encoding).

    A static image is the same at every step, and so are its stage-0 conv and BatchNorm outputs: with
    `stem_once` they are computed once and broadcast over T (the values of T copies, T times less work).
    """
    d = self.embed_dim
    widths = (d // 8, d // 4, d // 2, d, d)
    stage0 = ConvBN(widths[0], dtype=self.dtype, spike_input=False, name='stage0')
    if x.ndim == 5:
      x = stage0(x, train)
    elif self.stem_once:
      x = stage0(x, train, repeats=self.T)
      x = repeat_over_time(x, self.T) if self.spike_kernels else jnp.broadcast_to(x[None], (self.T,) + x.shape)
    else:
      x = stage0(jnp.broadcast_to(x[None], (self.T,) + x.shape), train)
    if self.style == 'spikformer':
      for k in range(4):
        if k > 0:
          x = ConvBN(widths[k], dtype=self.dtype, spike_kernels=self.spike_kernels, name=f'stage{k}')(x, train)
        x = LIF(self.lif, name=f'lif{k}')(x)
        if self.pool[k]:
          x = max_pool(x, self.spike_kernels)
      rpe = ConvBN(widths[4], dtype=self.dtype, spike_kernels=self.spike_kernels, name='stage4')(x, train)
      return LIF(self.lif, name='lif4')(rpe) + x
    for k in range(1, 5):
      pool = self.pool[k - 1]
      if self.style == 'cml' and pool:
        x = max_pool(x, self.spike_kernels)
      x = LIF(self.lif, name=f'lif{k}')(x)
      if self.style == 'spikingformer' and pool:
        x = max_pool(x, self.spike_kernels)
      x = ConvBN(widths[k], dtype=self.dtype, spike_kernels=self.spike_kernels, name=f'stage{k}')(x, train)
    return x


class SpikingSelfAttention(nn.Module):
  """Spiking self-attention on `[T, B, N, D]`: (Q K^T V) * scale -> LIF(threshold 0.5), no softmax.

  pre_activation=True (Spikingformer): LIF -> {q,k,v} Dense-BN-LIF -> attention -> Dense-BN.
  pre_activation=False (Spikformer): {q,k,v} Dense-BN-LIF on the stream -> attention -> Dense-BN-LIF.
  `mask` (`[B, N]`, 1 for real tokens) zeroes padded keys and values, which keeps them binary.
  qkv_bias: biased q/k/v projections (the CIFAR Spikformer's nn.Linear layers); bias-free elsewhere.
  spike_kernels: the projections use the sparse CPU kernels (`ChannelDense`).
  """
  dim: int
  num_heads: int
  lif: neurons.LIFConfig
  attn_threshold: float = 0.5
  scale: float = 0.125
  pre_activation: bool = True
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None):
    if self.dim % self.num_heads:
      raise ValueError(f'dim {self.dim} must be divisible by num_heads {self.num_heads}.')
    n, d = x.shape[2:]
    bn_mask = None if mask is None else mask[None, :, :, None].astype(bool)
    if self.pre_activation:
      x = LIF(self.lif, name='proj_lif')(x)

    def qkv(name):
      y = ChannelDense(d, use_bias=self.qkv_bias, dtype=self.dtype, spike_kernels=self.spike_kernels,
                       name=f'{name}_conv')(x)
      y = batch_norm(train, self.dtype, f'{name}_bn')(y, bn_mask)
      return LIF(self.lif, name=f'{name}_lif')(y)

    q, k, v = qkv('q'), qkv('k'), qkv('v')
    if mask is not None:
      token_mask = mask[None, :, :, None].astype(k.dtype)
      k, v = k * token_mask, v * token_mask
    q, k, v = spike_operand(q), spike_operand(k), spike_operand(v)
    heads = lambda y: einops.rearrange(y, 't b n (h c) -> t b n h c', h=self.num_heads)
    q, k, v = heads(q), heads(k), heads(v)
    # Spike products are integer counts: accumulate in float32 and keep the intermediate count matrix in
    # float32 (bfloat16 is exact only up to 256, and K^T V counts reach N).
    f32 = dict(preferred_element_type=jnp.float32)
    if jax.default_backend() == 'cpu' and q.dtype != jnp.float32:
      # XLA:CPU has no bfloat16 x bfloat16 -> float32 dot; 0/1 spikes are exact in float32.
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if n > d // self.num_heads:  # K^T V first: N d^2 work instead of N^2 d (the ImageNet reference's order).
      with jax.named_scope('kv'):
        kv = jnp.einsum('tbnhi,tbnhj->tbhij', k, v, **f32)
      with jax.named_scope('q_kv'):
        y = jnp.einsum('tbnhi,tbhij->tbnhj', q, kv, **f32)
    else:
      with jax.named_scope('qk'):
        qk = jnp.einsum('tbnhi,tbmhi->tbhnm', q, k, **f32)
      with jax.named_scope('qk_v'):
        y = jnp.einsum('tbhnm,tbmhj->tbnhj', qk, v, **f32)
    y = product_out(einops.rearrange(y * self.scale, 't b n h c -> t b n (h c)').astype(self.dtype))
    lif_attn = self.lif.replace(v_threshold=self.attn_threshold)
    y = LIF(lif_attn, name='attn_lif')(y)
    y = ChannelDense(d, use_bias=True, dtype=self.dtype, spike_kernels=self.spike_kernels, name='proj_conv')(y)
    y = batch_norm(train, self.dtype, 'proj_bn')(y, bn_mask)
    if not self.pre_activation:
      y = LIF(self.lif, name='proj_lif')(y)
    return y


class SpikingMLP(nn.Module):
  """Pre-activation (LIF-Dense-BN x2, Spikingformer) or post-activation (Dense-BN-LIF x2, Spikformer)."""
  dim: int
  hidden_dim: int
  lif: neurons.LIFConfig
  pre_activation: bool = True
  dtype: Dtype = jnp.float32
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None):
    bn_mask = None if mask is None else mask[None, :, :, None].astype(bool)
    for i, width in ((1, self.hidden_dim), (2, self.dim)):
      if self.pre_activation:
        x = LIF(self.lif, name=f'mlp{i}_lif')(x)
      x = ChannelDense(width, use_bias=True, dtype=self.dtype, spike_kernels=self.spike_kernels,
                       name=f'mlp{i}_conv')(x)
      x = batch_norm(train, self.dtype, f'mlp{i}_bn')(x, bn_mask)
      if not self.pre_activation:
        x = LIF(self.lif, name=f'mlp{i}_lif')(x)
    return x


class Block(nn.Module):
  """x + SSA(x), then x + MLP(x) on the `[T, B, N, D]` residual stream (no LayerNorm, no DropPath)."""
  dim: int
  num_heads: int
  mlp_ratio: float
  lif: neurons.LIFConfig
  pre_activation: bool = True
  attn_scale: float = 0.125
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  spike_kernels: bool = False

  @nn.compact
  def __call__(self, x, train: bool, mask: Optional[jax.Array] = None):
    x = x + SpikingSelfAttention(self.dim, self.num_heads, self.lif, scale=self.attn_scale,
                                 pre_activation=self.pre_activation, qkv_bias=self.qkv_bias, dtype=self.dtype,
                                 spike_kernels=self.spike_kernels, name='attn')(x, train, mask)
    x = x + SpikingMLP(self.dim, int(self.dim * self.mlp_ratio), self.lif,
                       pre_activation=self.pre_activation, dtype=self.dtype, spike_kernels=self.spike_kernels,
                       name='mlp')(x, train, mask)
    return x
