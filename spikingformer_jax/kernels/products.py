"""Spike-operand products on the CPU: custom VJPs around the FFI kernels, and flax-compatible adapters.

`spike_matmul(a, w)` = a @ w and `spike_conv3x3(a, w)` = the 3x3 stride-1 SAME convolution (NHWC, HWIO),
whose left operand `a` is a spike tensor. The forward product and the weight gradient run in the
kernels of `spike_products.cc`, whose work is proportional to the number of non-zero entries of `a`;
the input gradient (`g @ w^T`, or the transposed convolution) has no sparse operand and stays XLA's.

Results equal XLA's up to float rounding (the kernels sum the non-zero terms in another order) for any
values of `a`, binary or not; only the speed depends on its density. With `integer_a` the caller vouches that
`a` holds integers in [-128, 127] (the layers' spike operands, `layers.spike_operand`): the kernels then read an
int8 copy of it, a quarter of the bytes, and the backward pass keeps that copy. XLA folds the cast into
`a`'s producer, which then writes int8 instead of float32.

`dot_general` and `conv_general_dilated` have the signatures flax's `nn.Dense` / `nn.Conv` call, and use
the kernels where they apply: on the CPU backend, float32 operands, a `[..., K] x [K, N]` contraction or a
3x3 stride-1 SAME NHWC convolution, and a library that compiled. Anywhere else they are `jax.lax`'s.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from spikingformer_jax.kernels import build

_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered (compiling them on the first call); logs why not."""
  try:
    build.load()
  except (build.KernelBuildError, OSError, AttributeError) as e:
    logging.warning('Spike kernels unavailable, using XLA\'s dense products instead: %s', e)
    return False
  return True


def _ffi(name: str, shape, *args):
  build.load()  # Registers the targets (compiling the library on first use); raises KernelBuildError if it can't.
  return jax.ffi.ffi_call(build.PREFIX + name, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(*args)


def _pad_hw(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _xla_conv3x3(a, w):
  return lax.conv_general_dilated(a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_CONV_DIMENSIONS)


def _spike_operand(a, integer_a: bool):
  return a.astype(jnp.int8) if integer_a else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def spike_matmul(a: jax.Array, w: jax.Array, integer_a: bool = False) -> jax.Array:
  """a [M, K] @ w [K, N] (float32), with the forward product and dw done by the sparse kernels."""
  return _ffi('SpikeMatmul', (a.shape[0], w.shape[1]), _spike_operand(a, integer_a), w)


def _spike_matmul_fwd(a, w, integer_a):
  return spike_matmul(a, w, integer_a), (_spike_operand(a, integer_a), w)


def _spike_matmul_bwd(integer_a, residuals, g):
  del integer_a  # the residual is already the kernels' operand
  a, w = residuals
  grad_a = lax.dot_general(g, w, (((1,), (1,)), ((), ())))  # g @ w^T
  return grad_a, _ffi('SpikeMatmulT', w.shape, a, g)


spike_matmul.defvjp(_spike_matmul_fwd, _spike_matmul_bwd)



@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def spike_conv3x3(a: jax.Array, w: jax.Array, integer_a: bool = False) -> jax.Array:
  """The 3x3 stride-1 SAME convolution of a [B, H, W, C] with w [3, 3, C, O] (float32)."""
  return _ffi('SpikeConv3x3', a.shape[:3] + (w.shape[3],), _pad_hw(_spike_operand(a, integer_a)), w)


def _spike_conv3x3_fwd(a, w, integer_a):
  return spike_conv3x3(a, w, integer_a), (_spike_operand(a, integer_a), w)


def _spike_conv3x3_bwd(integer_a, residuals, g):
  del integer_a  # the residual is already the kernels' operand
  a, w = residuals
  input_transpose = jax.linear_transpose(lambda a_: _xla_conv3x3(a_, w), jax.ShapeDtypeStruct(a.shape, g.dtype))
  return input_transpose(g)[0], _ffi('SpikeConv3x3WGrad', w.shape, _pad_hw(a), _pad_hw(g))


spike_conv3x3.defvjp(_spike_conv3x3_fwd, _spike_conv3x3_bwd)


def applies(*arrays) -> bool:
  """Whether the kernels can take these operands: CPU backend, float32, a library that compiled."""
  return (jax.default_backend() == 'cpu' and all(x.dtype == jnp.float32 for x in arrays)
          and available())


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, integer_lhs=False):
  """`lax.dot_general`, through `spike_matmul` for flax Dense's `[..., K] x [K, N]` on the CPU.

  integer_lhs: lhs holds integers in [-128, 127] (`spike_matmul`'s `integer_a`).
  """
  dense_contraction = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (rhs.ndim == 2 and tuple(map(tuple, dimension_numbers[0])) == dense_contraction[0]
      and not any(dimension_numbers[1]) and preferred_element_type in (None, jnp.float32)
      and applies(lhs, rhs)):
    y = spike_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs, integer_lhs)
    return y.reshape(lhs.shape[:-1] + rhs.shape[1:])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, integer_lhs=False):
  """`lax.conv_general_dilated`, through `spike_conv3x3` for a 3x3 stride-1 SAME NHWC conv on the CPU.

  integer_lhs: lhs holds integers in [-128, 127] (`spike_conv3x3`'s `integer_a`).
  """
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CONV_DIMENSIONS)
  padding_pairs = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  if (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
      and padding_pairs in ('SAME', ((1, 1), (1, 1))) and all(
          d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type in (None, jnp.float32) and applies(lhs, rhs)):
    return spike_conv3x3(lhs, rhs, integer_lhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  batch_group_count=batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)
