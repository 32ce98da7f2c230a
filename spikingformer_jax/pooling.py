"""MaxPool2d(kernel 3, stride 2, padding 1) on `[N, H, W, C]`, with a backward pass free of select-and-scatter.

The forward pass is the maximum of the nine strided window views of the padded input: `nn.max_pool`'s values
in one elementwise pass (XLA:CPU's `reduce_window` took 1.4-1.9x as long; benchmarks/max_pool.py). The gradient
goes, as PyTorch's and XLA's do, to the first maximum of each window in row-major order (dy, then dx): the padding (-inf)
never wins. XLA:CPU differentiates `reduce_window` with a select-and-scatter that carries four int32
index tensors through a reduce-window and then scatters; on the pooled spike maps of the CIFAR stem
that was ~10% of a training step (benchmarks/cifar_cpu_step.py, BENCHMARKS.md). Here the forward pass
also records, in one byte per output, which of the nine window positions won, and the backward pass
sorts each output's gradient into the four stride-2 parities of the input and interleaves them:
elementwise work only.

    winner[o]  = min { k : window_k(x)[o] == y[o] },   k = 3 dy + dx
    grad_x[p]  = sum of g[o] over the outputs o whose winning window position k is p
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_WINDOW, _STRIDE = 3, 2


def _pooled_size(n: int) -> int:
  return (n + 2 - _WINDOW) // _STRIDE + 1


def _window_views(x):
  """The nine `[N, Ho, Wo, C]` strided views of x padded with -inf, in row-major window order."""
  n, h, w, c = x.shape
  ho, wo = _pooled_size(h), _pooled_size(w)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [lax.slice(padded, (0, dy, dx, 0), (n, dy + _STRIDE * (ho - 1) + 1, dx + _STRIDE * (wo - 1) + 1, c),
                    (1, _STRIDE, _STRIDE, 1))
          for dy in range(_WINDOW) for dx in range(_WINDOW)]


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """MaxPool2d(3, stride 2, padding 1) of x `[N, H, W, C]` (a float dtype)."""
  return functools.reduce(lax.max, _window_views(x))


def winners(views, y):
  """The first window position k (int8) whose view equals the maximum `y`, for each output."""
  winner = jnp.full(y.shape, _WINDOW * _WINDOW - 1, jnp.int8)
  for k, view in reversed(list(enumerate(views))):
    winner = jnp.where(view == y, jnp.int8(k), winner)
  return winner


def _forward(x):
  views = _window_views(x)
  y = functools.reduce(lax.max, views)
  return y, (winners(views, y), x.shape)


def _shift(v, axis):
  """v[..., i + 1, ...] along `axis` (1 or 2), zero past the end."""
  pad = [(0, 0)] * v.ndim
  pad[axis] = (0, 1)
  return jnp.pad(lax.slice_in_dim(v, 1, v.shape[axis], axis=axis), pad)


def _backward(residuals, g):
  """Input position (2a + r, 2b + s) is window row dy = 1 of output row a if r = 0, else dy = 2 of row a
  and dy = 0 of row a + 1 (the same for columns), so each of the four parities of (r, s) gathers 1, 2, 2
  or 4 of the nine masked gradients, and the four planes interleave into the input's shape."""
  winner, (_, h, w, _) = residuals
  part = [jnp.where(winner == k, g, jnp.zeros_like(g)) for k in range(_WINDOW * _WINDOW)]
  at = lambda dy, dx: part[_WINDOW * dy + dx]
  even_even = at(1, 1)
  even_odd = at(1, 2) + _shift(at(1, 0), 2)
  odd_even = at(2, 1) + _shift(at(0, 1), 1)
  odd_odd = at(2, 2) + _shift(at(2, 0), 2) + _shift(at(0, 2), 1) + _shift(_shift(at(0, 0), 1), 2)
  n, ho, wo, c = g.shape
  planes = jnp.stack([jnp.stack([even_even, even_odd], axis=3), jnp.stack([odd_even, odd_odd], axis=3)], axis=2)
  return (planes.reshape(n, _STRIDE * ho, _STRIDE * wo, c)[:, :h, :w],)  # [n, ho, r, wo, s, c] -> rows 2a + r


max_pool_3x3_s2.defvjp(_forward, _backward)
