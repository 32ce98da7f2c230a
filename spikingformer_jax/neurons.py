"""Pure multi-step spiking neurons over a leading time axis `[T, ...]`.

The equations are SpikingJelly's `MultiStepLIFNode` (the neuron of the reference code):

  charge      H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau          (decay_input, hard reset)
              H[t] = V[t-1] + (X[t] - V[t-1]) / tau                       (decay_input, soft reset)
              H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]             (no decay_input, hard)
              H[t] = V[t-1] - V[t-1] / tau + X[t]                         (no decay_input, soft)
  fire        S[t] = Θ(H[t] - V_th)
  reset       V[t] = H[t] (1 - S[t]) + V_reset S[t]                       (hard, v_reset is a float)
              V[t] = H[t] - V_th S[t]                                     (soft, v_reset is None)

with V[-1] = V_reset (0 for the soft reset). With `detach_reset` the spike used in the reset is
a constant for autodiff, which reproduces SpikingJelly's BPTT kernel exactly.

The time loop is a `jax.lax.scan`; at the small T of Spikingformer (4) a fully unrolled scan
lets XLA fuse the whole neuron into one elementwise kernel, which is ~3x faster than a rolled
loop on CPU (see BENCHMARKS.md), so `unroll=True` is the default.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from spikingformer_jax import kernels
from spikingformer_jax.surrogates import get_surrogate, spike


@dataclasses.dataclass(frozen=True)
class LIFConfig:
  """Hyper-parameters of a (multi-step) LIF neuron; defaults are SpikingJelly's / the reference's."""
  tau: float = 2.0
  v_threshold: float = 1.0
  v_reset: Optional[float] = 0.0  # None: soft reset (subtract the threshold).
  decay_input: bool = True
  detach_reset: bool = True
  surrogate: str = 'sigmoid'
  alpha: Optional[float] = None  # None: the surrogate's default (4.0 for sigmoid).
  unroll: int | bool = True
  cpu_kernel: bool = False  # the BPTT in kernels.lif_backward where it applies (CPU, float32, sigmoid)

  def __post_init__(self):
    if not self.tau > 1.0:
      raise ValueError(f'LIF tau must be > 1 (as SpikingJelly asserts), got {self.tau}.')
    get_surrogate(self.surrogate)  # Validates the name.

  def replace(self, **kwargs) -> 'LIFConfig':
    return dataclasses.replace(self, **kwargs)


def _charge(v, x, cfg: LIFConfig):
  rest, decay = 0.0 if cfg.v_reset is None else cfg.v_reset, 1.0 / cfg.tau
  if cfg.decay_input:
    return v + (x - (v - rest)) * decay
  return v - (v - rest) * decay + x


def _scan(x: jax.Array, cfg: LIFConfig) -> tuple[jax.Array, jax.Array]:
  """Spikes S and margins H - V_th over time: the charge, fire and reset equations above, as one scan."""
  if x.ndim < 1:
    raise ValueError(f'Neuron input needs a leading time axis [T, ...], got shape {x.shape}.')
  rest = 0.0 if cfg.v_reset is None else cfg.v_reset

  def step(v, x_t):
    h = _charge(v, x_t, cfg)
    margin = h - cfg.v_threshold
    s = spike(margin, cfg.surrogate, cfg.alpha)
    s_reset = jax.lax.stop_gradient(s) if cfg.detach_reset else s
    v = h - s_reset * cfg.v_threshold if cfg.v_reset is None else h * (1.0 - s_reset) + cfg.v_reset * s_reset
    return v, (s, margin)

  _, (spikes, margins) = jax.lax.scan(step, jnp.full(x.shape[1:], rest, x.dtype), x, unroll=cfg.unroll)
  return spikes, margins


def lif(x: jax.Array, cfg: LIFConfig = LIFConfig()) -> jax.Array:
  """Multi-step LIF: spikes `[T, ...]` (0/1 in x's dtype) for the input current `x` `[T, ...]`.

  With `detach_reset` (the reference's setting) the gradient is a hand-written BPTT whose only
  residual is `x`: autodiff through the scan would keep two `[T, ...]` tensors per neuron (H - V_th
  and 1 - S) alive until the backward pass. Without it, autodiff runs through the scan.
  """
  if cfg.detach_reset:
    return _lif_bptt(x, cfg)
  return _scan(x, cfg)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lif_bptt(x: jax.Array, cfg: LIFConfig) -> jax.Array:
  return _scan(x, cfg)[0]


def _lif_bptt_fwd(x, cfg):
  return _lif_bptt(x, cfg), x


def _lif_bptt_bwd(cfg, x, g):
  """grad_H[t] = g[t] sg'(H[t] - V_th) + grad_V[t] dV/dH[t],  grad_V[t-1] = grad_H[t] (1 - 1/tau)."""
  grad_fn, default_alpha = get_surrogate(cfg.surrogate)
  alpha = default_alpha if cfg.alpha is None else cfg.alpha
  if cfg.cpu_kernel and kernels.lif_backward_applies(x, cfg):
    return (kernels.lif_backward(x, g, cfg, alpha),)
  spikes, margins = _scan(x, cfg)
  decay = 1.0 / cfg.tau

  def step(grad_v, inputs):
    g_t, s_t, margin_t = inputs
    through_v = grad_v if cfg.v_reset is None else grad_v * (1.0 - s_t)
    grad_h = g_t * grad_fn(margin_t, alpha).astype(g.dtype) + through_v
    return grad_h * (1.0 - decay), grad_h * decay if cfg.decay_input else grad_h

  _, grad_x = jax.lax.scan(step, jnp.zeros_like(g[0]), (g, spikes, margins), reverse=True,
                           unroll=cfg.unroll)
  return (grad_x,)


_lif_bptt.defvjp(_lif_bptt_fwd, _lif_bptt_bwd)
