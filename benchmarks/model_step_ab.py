"""Paired A/B of the CIFAR 4-384 training step in ONE process: batchnorm.BatchNorm vs flax's BatchNorm
(`--compare bn`), or XLA's products vs the sparse spike kernels (`--compare spike_kernels`).

On the shared 2-core machine whole-process timings swing between rounds; here both steps are compiled in
the same process (with the XLA:CPU options main.py applies) and their calls alternate, so each pair sees
the same load. Prints per-pair step times, the median ratio, and each step's XLA temporary memory.

  /tmp/bench-venv/bin/python -m benchmarks.model_step_ab --pairs 4
  /tmp/bench-venv/bin/python -m benchmarks.model_step_ab --pairs 6 --compare spike_kernels
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from spikingformer_jax import cpu_runtime

os.environ['XLA_FLAGS'] = cpu_runtime.merged(os.environ.get('XLA_FLAGS', ''))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from spikingformer_jax import layers, registry  # noqa: E402

MODEL = 'spikingformer-cifar-4-384'


def compiled_train_step(batch: int, spike_kernels: bool = False):
  model = registry.get_model(MODEL, spike_kernels=spike_kernels)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
  step, state = common.adamw_train_step(model, images, labels, weight_decay=0.05)
  return step.lower(*state).compile(), state


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', type=int, default=4)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--compare', choices=['bn', 'spike_kernels'], default='bn')
  args = parser.parse_args()
  if args.compare == 'bn':
    baseline, other = 'batchnorm.BatchNorm', 'flax BatchNorm'
    steps = {baseline: compiled_train_step(args.batch)}
    shipped, layers.batch_norm = layers.batch_norm, common.flax_batch_norm
    steps[other] = compiled_train_step(args.batch)
    layers.batch_norm = shipped
  else:
    baseline, other = 'XLA products', 'spike kernels'
    steps = {baseline: compiled_train_step(args.batch), other: compiled_train_step(args.batch, spike_kernels=True)}
  times = {name: [] for name in steps}
  for i in range(args.pairs + 1):  # The first pair warms up.
    for name, (step, state) in (steps.items() if i % 2 else reversed(steps.items())):
      start = time.perf_counter()
      jax.block_until_ready(step(*state))
      if i:
        times[name].append(time.perf_counter() - start)
  for name, (step, _) in steps.items():
    print(f'{name}: ' + ', '.join(f'{x:.2f}' for x in times[name]) + f' s (median {statistics.median(times[name]):.2f}); '
          f'XLA temp {step.memory_analysis().temp_size_in_bytes / 1e9:.2f} GB')
  ratios = [o / b for o, b in zip(times[other], times[baseline])]
  print(f'{other} / {baseline} step time per pair: ' + ', '.join(f'{r:.2f}' for r in ratios)
        + f' (median {statistics.median(ratios):.2f}x)')


if __name__ == '__main__':
  main()
