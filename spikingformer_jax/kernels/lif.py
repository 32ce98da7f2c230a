"""The BPTT of `neurons.lif` on the CPU: a custom call into the one-pass kernel of `lif_backward.cc`.

`neurons.lif` calls it in its backward pass when its `LIFConfig.cpu_kernel` is set (models set it with
`spike_kernels=True`) and it applies here: the sigmoid surrogate with a detached reset, float32 on the CPU
backend, and a library that compiled. The gradients equal the unrolled reverse scan's up to float rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spikingformer_jax.kernels import build, products


def lif_backward_applies(x, cfg) -> bool:
  """Whether `lif_backward` computes this neuron's BPTT: sigmoid surrogate, float32 on the CPU."""
  return cfg.surrogate == 'sigmoid' and cfg.detach_reset and products.applies(x)


def lif_backward(x: jax.Array, g: jax.Array, cfg, alpha: float) -> jax.Array:
  """The BPTT of `neurons.lif` (detach_reset, sigmoid surrogate of slope `alpha`) for input `x` and spike
  cotangent `g` (`[T, ...]` float32), in the one-pass kernel of `lif_backward.cc`."""
  build.load()
  return jax.ffi.ffi_call(build.PREFIX + 'LifBackward', jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method='sequential')(
      x, g, decay=np.float32(1.0 / cfg.tau), v_threshold=np.float32(cfg.v_threshold),
      v_reset=np.float32(0.0 if cfg.v_reset is None else cfg.v_reset), hard_reset=cfg.v_reset is not None,
      decay_input=bool(cfg.decay_input), alpha=np.float32(alpha))
