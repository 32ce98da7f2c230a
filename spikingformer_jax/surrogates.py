"""Spike functions: a Heaviside forward pass with a surrogate derivative in the backward pass.

Each surrogate is the derivative dS/dx of a smooth stand-in for the step, evaluated at
x = H - V_th. The spike function is a `jax.custom_vjp` whose residual is only `x` (the
membrane input): the surrogate derivative is recomputed in the backward pass instead of
being stored, which keeps activation memory at one tensor per neuron call.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

SurrogateGrad = Callable[[jax.Array, float], jax.Array]


def sigmoid_grad(x: jax.Array, alpha: float) -> jax.Array:
  """SpikingJelly `surrogate.Sigmoid`: d/dx sigmoid(alpha x) (peak alpha/4 at 0)."""
  sg = jax.nn.sigmoid(alpha * x)
  return alpha * sg * (1.0 - sg)


def atan_grad(x: jax.Array, alpha: float) -> jax.Array:
  """SpikingJelly `surrogate.ATan`: d/dx [atan(pi/2 alpha x)/pi + 1/2]."""
  return (alpha / 2.0) / (1.0 + jnp.square(jnp.pi / 2.0 * alpha * x))


def triangle_grad(x: jax.Array, alpha: float) -> jax.Array:
  """Piecewise-linear (triangle) of half-width 1/alpha and unit area: alpha * max(0, 1 - alpha|x|)."""
  return alpha * jnp.maximum(0.0, 1.0 - alpha * jnp.abs(x))


def straight_through_grad(x: jax.Array, alpha: float) -> jax.Array:
  """Straight-through estimator: the step's derivative is taken as 1 everywhere (alpha unused)."""
  del alpha
  return jnp.ones_like(x)


SURROGATES: dict[str, tuple[SurrogateGrad, float]] = {
    # name: (derivative, default alpha)
    'sigmoid': (sigmoid_grad, 4.0),
    'atan': (atan_grad, 2.0),
    'triangle': (triangle_grad, 1.0),
    'straight_through': (straight_through_grad, 1.0),
}


def get_surrogate(name: str) -> tuple[SurrogateGrad, float]:
  if name not in SURROGATES:
    raise ValueError(f'Unknown surrogate {name!r}; expected one of {sorted(SURROGATES)}.')
  return SURROGATES[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: str = 'sigmoid', alpha: float | None = None) -> jax.Array:
  """Heaviside step Θ(x) (1 where x >= 0, as SpikingJelly's kernels) with a surrogate gradient."""
  del surrogate, alpha
  return (x >= 0).astype(x.dtype)


def _spike_fwd(x, surrogate, alpha):
  return spike(x, surrogate, alpha), x


def _spike_bwd(surrogate, alpha, x, g):
  grad_fn, default_alpha = get_surrogate(surrogate)
  a = default_alpha if alpha is None else alpha
  return (g * grad_fn(x, a).astype(g.dtype),)


spike.defvjp(_spike_fwd, _spike_bwd)
