"""The CIFAR stem's max-pools (3x3, stride 2, on spikes): `pooling.max_pool_3x3_s2` against flax's `nn.max_pool`.

For the two pooled shapes of the CIFAR 2-256 / 4-256 stem at T=4, batch 32 (`[T*B, H, W, C]`), one run times in
interleaved rounds: the forward pass alone; the forward pass that the training step runs (flax: the
`reduce_window`; ours: the max of the nine window views plus the one-byte winner index that the backward uses; and
the previous release's: the `reduce_window`, then the winners from the views); forward + backward. Values and
gradients are checked equal first.

  python -m benchmarks.max_pool [--repeats 15]
"""
from __future__ import annotations

import argparse

from benchmarks import common
from spikingformer_jax import cpu_runtime

SHAPES = {'stage 3 input [128, 32, 32, 128]': (128, 32, 32, 128), 'stage 4 input [128, 16, 16, 256]': (128, 16, 16, 256)}


def _values_and_winners(y, residuals):
  return y, residuals[0]


def _previous_training_forward(x):
  """The previous release's forward: XLA's reduce_window, then the winners compared against it."""
  from jax import lax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from spikingformer_jax import pooling  # noqa: PLC0415
  y = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return y, pooling.winners(pooling._window_views(x), y)  # noqa: SLF001


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=15)
  args = parser.parse_args()
  cpu_runtime.apply_cpu_flags()
  import flax.linen as nn  # noqa: PLC0415 (after the XLA flags)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from spikingformer_jax import pooling  # noqa: PLC0415

  def flax_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  print('\n'.join(common.machine_lines()) + '\n')
  print('| shape | pass | flax `nn.max_pool` (ms) | previous release (ms) | `pooling.max_pool_3x3_s2` (ms) | vs flax |')
  print('| --- | --- | --- | --- | --- | --- |')
  for label, shape in SHAPES.items():
    x = (jax.random.uniform(jax.random.key(0), shape) < 0.2).astype(np.float32)
    g = jax.random.normal(jax.random.key(1), flax_pool(x).shape)
    passes = {  # (flax, previous release or None, ours)
        'forward': (jax.jit(flax_pool), None, jax.jit(pooling.max_pool_3x3_s2)),
        'training forward (+ what the backward keeps)': (
            jax.jit(lambda v: jax.vjp(flax_pool, v)[0]), jax.jit(_previous_training_forward),
            jax.jit(lambda v: _values_and_winners(*pooling._forward(v)))),  # noqa: SLF001
        'forward + backward': (jax.jit(lambda v: jax.vjp(flax_pool, v)[1](g)), None,
                               jax.jit(lambda v: jax.vjp(pooling.max_pool_3x3_s2, v)[1](g))),
    }
    np.testing.assert_array_equal(*(np.asarray(f(x)) for f in passes['forward'][::2]))
    np.testing.assert_array_equal(*(np.asarray(f(x)[0]) for f in passes['forward + backward'][::2]))
    previous, ours = passes['training forward (+ what the backward keeps)'][1:]
    np.testing.assert_array_equal(np.asarray(previous(x)[1]), np.asarray(ours(x)[1]))
    for name, contenders in passes.items():
      timed = [f for f in contenders if f is not None]
      times = {f: [] for f in timed}
      for _ in range(args.repeats):
        for f in timed:
          times[f].append(common.median_time(lambda f=f: jax.block_until_ready(f(x)), 1)[0])
      ms = [sorted(times[f])[args.repeats // 2] * 1e3 if f is not None else None for f in contenders]
      cells = ' | '.join('—' if t is None else f'{t:.1f}' for t in ms)
      print(f'| {label} | {name} | {cells} | {ms[2] / ms[0]:.2f}x |')


if __name__ == '__main__':
  main()
