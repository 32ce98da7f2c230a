"""The sparse spike kernels against XLA's dense products, one product at a time, at the shapes and spike
densities of the CIFAR 4-384 training step (T=4, batch 16; densities from results/spike_density.md).

For each product: the forward product and the weight gradient, XLA's (with the XLA:CPU options main.py
applies: Eigen convolutions) and the kernels', interleaved in one process; median milliseconds, the
ratio, and the largest difference relative to the result's largest magnitude. The input gradient of
either has no sparse operand and is XLA's in both.

  /tmp/venv/bin/python -m benchmarks.spike_kernels   # writes benchmarks/results/spike_kernels.md
  # What CPUs without AVX-512 get: the AVX2 paths, and without AVX2 the portable loops:
  SPIKINGFORMER_KERNEL_CFLAGS=-mno-avx512f /tmp/venv/bin/python -m benchmarks.spike_kernels \
      --out benchmarks/results/spike_kernels_avx2.md
  SPIKINGFORMER_KERNEL_CFLAGS='-mno-avx512f -mno-avx2' /tmp/venv/bin/python -m benchmarks.spike_kernels \
      --out benchmarks/results/spike_kernels_portable.md
"""
from __future__ import annotations

import argparse
import os
import statistics

from spikingformer_jax import cpu_runtime

os.environ['XLA_FLAGS'] = cpu_runtime.merged(os.environ.get('XLA_FLAGS', ''))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from spikingformer_jax import kernels  # noqa: E402
from spikingformer_jax.kernels import build, products  # noqa: E402

# (name, spike operand shape, weight shape, density): T*B = 64 images, T*B*N = 4096 tokens.
DENSE = [('mlp1 (block 3)', (4096, 384), (384, 1536), 0.130), ('mlp2', (4096, 1536), (1536, 384), 0.034),
         ('q/k/v (block 3)', (4096, 384), (384, 384), 0.127), ('q/k/v (block 0)', (4096, 384), (384, 384), 0.037)]
CONV = [('stage1 conv', (64, 32, 32, 48), (3, 3, 48, 96), 0.070), ('stage2 conv', (64, 32, 32, 96), (3, 3, 96, 192), 0.046),
        ('stage3 conv', (64, 16, 16, 192), (3, 3, 192, 384), 0.257), ('stage4 conv', (64, 8, 8, 384), (3, 3, 384, 384), 0.199)]


def _rel(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per block')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved blocks per contender')
  parser.add_argument('--out', default=f'{common.REPO_ROOT}/benchmarks/results/spike_kernels.md')
  args = parser.parse_args()
  if not kernels.available():
    raise SystemExit('The spike kernels cannot be built here; see the logged reason.')
  key = jax.random.PRNGKey(0)
  rows = []
  for name, a_shape, w_shape, density in DENSE + CONV:
    ka, kw, kg = jax.random.split(jax.random.fold_in(key, len(rows)), 3)
    a = (jax.random.uniform(ka, a_shape) < density).astype(jnp.float32)
    w = jax.random.normal(kw, w_shape) / jnp.sqrt(a_shape[-1])
    if len(a_shape) == 2:
      xla_fwd, our_fwd = (lambda a, w: a @ w), kernels.spike_matmul
      g = jax.random.normal(kg, (a_shape[0], w_shape[1]))
      macs = a_shape[0] * a_shape[1] * w_shape[1]
    else:
      xla_fwd, our_fwd = products._xla_conv3x3, kernels.spike_conv3x3  # noqa: SLF001
      g = jax.random.normal(kg, a_shape[:3] + (w_shape[3],))
      macs = a_shape[0] * a_shape[1] * a_shape[2] * 9 * a_shape[3] * w_shape[3]
    weight_grad = lambda fwd: (lambda a, w, g: jax.vjp(lambda w_: fwd(a, w_), w)[1](g)[0])
    contenders = {('forward', 'xla'): (jax.jit(xla_fwd), (a, w)), ('forward', 'kernels'): (jax.jit(our_fwd), (a, w)),
                  ('weight gradient', 'xla'): (jax.jit(weight_grad(xla_fwd)), (a, w, g)),
                  ('weight gradient', 'kernels'): (jax.jit(weight_grad(our_fwd)), (a, w, g))}
    times = {k: [] for k in contenders}
    for _ in range(args.rounds):
      for k, (fn, fn_args) in contenders.items():
        times[k] += common.median_time(lambda: jax.block_until_ready(fn(*fn_args)), args.repeats)[1]
    for product in ('forward', 'weight gradient'):
      xla_ms = statistics.median(times[(product, 'xla')]) * 1e3
      our_ms = statistics.median(times[(product, 'kernels')]) * 1e3
      xla_fn, xla_args = contenders[(product, 'xla')]
      our_fn, _ = contenders[(product, 'kernels')]
      rows.append([name, product, f'{density:.3f}', f'{2 * macs / 1e9:.1f}', f'{xla_ms:.1f}', f'{our_ms:.1f}',
                   f'{xla_ms / our_ms:.2f}x', f'{_rel(our_fn(*xla_args), xla_fn(*xla_args)):.1e}'])
      print(' | '.join(rows[-1]), flush=True)
  extra = os.environ.get('SPIKINGFORMER_KERNEL_CFLAGS')
  command = (f'SPIKINGFORMER_KERNEL_CFLAGS={extra} ' if extra else '') + common.command_line('benchmarks.spike_kernels')
  lines = ['# Sparse spike kernels vs XLA, one product at a time (CIFAR 4-384 training-step shapes)', '',
           f'Command: `{command}`', '']
  lines += common.machine_lines()
  lines += ['', f'Random 0/1 spike operands at each layer\'s density in the training step; medians over {args.rounds} '
            f'interleaved blocks of {args.repeats} calls. XLA: Eigen convolutions and matmuls (the '
            '`cpu_runtime.CPU_FLAGS` options); kernels: spikingformer_jax/kernels, '
            + ('the portable loops', 'the AVX2 paths', 'the AVX-512 paths')[build.load().SpikeKernelsVectorized()]
            + f' (compiler flags {" ".join(build.flags())}). '
            'Difference: largest |kernels - XLA| over the largest |XLA|.', '']
  lines += common.markdown_table(['product', 'pass', 'spike density', 'dense GFLOP', 'XLA ms', 'kernels ms',
                                  'speed-up', 'difference'], rows)
  common.write_report(args.out, lines)


if __name__ == '__main__':
  main()
