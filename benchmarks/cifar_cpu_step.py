"""The training step of `experiments/cifar10.py:cpu` (Spikingformer-2-256, T=4, batch 32, spike kernels) on
this CPU, as main.py runs it, against that step without each CPU-side change of this release.

Rows (each a fresh process, run in alternating rounds so they see the same load; medians reported):
- shipped: `cpu_runtime.apply_cpu_flags` (XLA:CPU flags and `reuse_freed_memory`), the max-pool of
  `pooling.max_pool_3x3_s2` (window-view forward, scatter-free backward), the one-pass LIF backward kernel
  (`kernels.lif_backward`), the stem's `layers.repeat_over_time`;
- glibc's default malloc: every step maps its large temporaries afresh and faults them in;
- XLA's max-pool (flax's `nn.max_pool`: reduce-window forward, select-and-scatter backward);
- XLA's LIF backward (the unrolled reverse scan);
- the stem's `broadcast_to` (its gradient a `reduce_sum` over T, which XLA:CPU hands to YNNPACK);
- all four undone (the step of the 2026-11-30 release, but for the spike kernels' C++, which
  `benchmarks/kernel_builds.py` compares across revisions).
Each row reports the step's median wall time, the minor page faults and kernel (sys) seconds per step,
and the process's peak RSS. Images: the real CIFAR-10 sample (../shared/data/cifar10) when present,
else normal noise.

  python -m benchmarks.cifar_cpu_step --rounds 3 --steps 10 [--only=LIF]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from benchmarks import common

ROWS = {
    'shipped': [],
    "glibc's default malloc": ['--default-malloc'],
    "XLA's max-pool (reduce-window, select-and-scatter)": ['--xla-pool'],
    "XLA's LIF backward": ['--xla-lif'],
    "the stem's broadcast_to (gradient: YNNPACK's reduce over T)": ['--broadcast-stem'],
    'all four undone': ['--default-malloc', '--xla-pool', '--xla-lif', '--broadcast-stem'],
}


def _images(batch):
  import numpy as np

  from spikingformer_jax import paths
  from spikingformer_jax.data import pipeline
  try:
    data = np.load(paths.shared_data_dir('cifar10') / 'train.npz')
  except (FileNotFoundError, OSError):
    return np.random.default_rng(0).standard_normal((batch, 32, 32, 3)).astype(np.float32), 'noise'
  x = data['images'][:batch].astype(np.float32) / 255.0
  return ((x - np.array(pipeline.CIFAR_MEAN)) / np.array(pipeline.CIFAR_STD)).astype(np.float32), 'CIFAR-10 sample'


def worker(args) -> dict:
  from spikingformer_jax import cpu_runtime
  if args.default_malloc:
    cpu_runtime.reuse_freed_memory = lambda: False
  cpu_runtime.apply_cpu_flags()
  import jax
  import jax.numpy as jnp

  from spikingformer_jax import kernels, layers, pooling, registry
  if args.broadcast_stem:
    layers.repeat_over_time = lambda x, T: jnp.broadcast_to(x[None], (T,) + x.shape)
  if args.xla_lif:
    kernels.lif_backward_applies = lambda x, cfg: False
  if args.xla_pool:
    import flax.linen as nn
    pooling.max_pool_3x3_s2 = lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  model = registry.get_model('spikingformer-cifar-4-256', depth=2, spike_kernels=True)
  images, source = _images(args.batch)
  step, state = common.adamw_train_step(model, jnp.asarray(images), jnp.arange(args.batch) % 10, weight_decay=0.06)
  for _ in range(2):
    state = jax.block_until_ready(step(*state))[:3]
  cpu_runtime.release_freed_memory()  # as train.py does after its first step
  usage, times = resource.getrusage(resource.RUSAGE_SELF), []
  for _ in range(args.steps):
    start = time.perf_counter()
    state = jax.block_until_ready(step(*state))[:3]
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return dict(step_s=statistics.median(times), faults=(after.ru_minflt - usage.ru_minflt) / args.steps,
              sys_s=(after.ru_stime - usage.ru_stime) / args.steps, peak_rss_gb=after.ru_maxrss / 2**20,
              images=source)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--default-malloc', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--xla-pool', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--xla-lif', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--broadcast-stem', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--only', default='', help='rows whose name contains this (and the shipped row)')
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  rows = {name: flags for name, flags in ROWS.items() if name == 'shipped' or args.only in name}
  results = {name: [] for name in rows}
  for _ in range(args.rounds):
    for name, flags in rows.items():
      results[name].append(common.run_worker('benchmarks.cifar_cpu_step', [
          '--worker', '--steps', str(args.steps), '--batch', str(args.batch), *flags], env={'JAX_PLATFORMS': 'cpu'}))
  shipped = statistics.median(r['step_s'] for r in results['shipped'])
  print(f'CIFAR 2-256, T=4, batch {args.batch}, {results["shipped"][0]["images"]}; {args.rounds} rounds x '
        f'{args.steps} steps; load average {os.getloadavg()[0]:.2f}\n')
  print('| step | median step (s) | vs shipped | page faults / step | sys s / step | peak RSS (GB) |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name, runs in results.items():
    step_s = statistics.median(r['step_s'] for r in runs)
    print(f'| {name} | {step_s:.3f} | {step_s / shipped:.2f}x | {statistics.median(r["faults"] for r in runs):,.0f} '
          f'| {statistics.median(r["sys_s"] for r in runs):.2f} | {max(r["peak_rss_gb"] for r in runs):.2f} |')


if __name__ == '__main__':
  main()
