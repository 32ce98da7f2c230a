"""The CIFAR training step of `experiments/cifar10.py:cpu` with the spike kernels of this checkout against the same
step with the kernels compiled from another git revision, paired in one process.

A change of the C++ kernels moves the step by a few percent, less than this shared machine drifts between two
processes. Here both libraries are loaded into one process (the baseline's FFI targets under another name prefix),
both steps are compiled, and their steps alternate, so each pair sees the same load. Everything but the kernels
(model, XLA flags, allocator) is this checkout's.

  python -m benchmarks.kernel_builds --baseline=HEAD~1 --steps 20
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import resource
import statistics
import subprocess
import tempfile
import time

from benchmarks import common
from benchmarks.cifar_cpu_step import _images

BASELINE_PREFIX = 'baseline_'


def build_at_revision(revision: str, out_dir: pathlib.Path) -> pathlib.Path:
  """The kernel library compiled (as kernels/build.py compiles it) from the sources of `revision`."""
  from spikingformer_jax.kernels import build  # noqa: PLC0415
  src = out_dir / 'src'
  src.mkdir(parents=True)
  for path in build.SOURCES + build.HEADERS:
    relative = path.relative_to(common.REPO_ROOT).as_posix()
    text = subprocess.run(['git', 'show', f'{revision}:{relative}'], capture_output=True, text=True, check=True,
                          cwd=common.REPO_ROOT).stdout
    (src / path.name).write_text(text)
  library = out_dir / 'baseline.so'
  build.compile_sources(build.compiler(), src, library)
  return library


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--baseline', default='HEAD', help='git revision whose kernels to compare against')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=32)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from spikingformer_jax import cpu_runtime
  cpu_runtime.apply_cpu_flags()
  import jax
  import jax.numpy as jnp

  from spikingformer_jax import registry
  from spikingformer_jax.kernels import build

  build.load()
  with tempfile.TemporaryDirectory() as tmp:
    baseline = ctypes.CDLL(str(build_at_revision(args.baseline, pathlib.Path(tmp))))
  for name in build.TARGETS:
    jax.ffi.register_ffi_target(BASELINE_PREFIX + name, jax.ffi.pycapsule(getattr(baseline, name)), platform='cpu')

  images, source = _images(args.batch)
  labels = jnp.arange(args.batch) % 10
  shipped_prefix, runs = build.PREFIX, {}
  for label, prefix in ((f'kernels of {args.baseline}', BASELINE_PREFIX), ('kernels of this checkout', shipped_prefix)):
    build.PREFIX = prefix  # read when a product or the LIF backward is traced
    model = registry.get_model('spikingformer-cifar-4-256', depth=2, spike_kernels=True)
    step, state = common.adamw_train_step(model, jnp.asarray(images), labels, weight_decay=0.06)
    for _ in range(2):
      state = jax.block_until_ready(step(*state))[:3]
    runs[label] = {'step': step, 'state': state, 'times': [], 'cpu': 0.0}
  build.PREFIX = shipped_prefix
  cpu_runtime.release_freed_memory()
  for _ in range(args.steps):
    for run in runs.values():
      before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      run['state'] = jax.block_until_ready(run['step'](*run['state']))[:3]
      run['times'].append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_SELF)
      run['cpu'] += after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

  print(f'CIFAR 2-256, T=4, batch {args.batch}, {source}; {args.steps} paired steps; '
        f'load average {os.getloadavg()[0]:.2f}\n')
  print('| step | median step (s) | vs baseline | CPU s / step |')
  print('| --- | --- | --- | --- |')
  base = statistics.median(next(iter(runs.values()))['times'])
  for label, run in runs.items():
    median = statistics.median(run['times'])
    print(f'| {label} | {median:.3f} | {median / base:.3f}x | {run["cpu"] / args.steps:.2f} |')


if __name__ == '__main__':
  main()
