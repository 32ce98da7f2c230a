"""Helpers shared by the benchmark scripts: machine description, timing, worker subprocesses, tables.

Every benchmark runs its contenders side by side in one invocation (interleaved rounds), because the
machine is shared: only ratios measured in the same run are comparable.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  return platform.processor() or 'unknown'


def ram_gib() -> float:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemTotal:'):
        return int(line.split()[1]) / 2**20
  return float('nan')


def cpu_flags() -> set[str]:
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('flags'):
        return set(line.split(':', 1)[1].split())
  return set()


def machine_lines() -> list[str]:
  """Markdown bullet lines describing the machine and the software versions."""
  versions = []
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'spikingjelly'):
    try:
      versions.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  simd = sorted(f for f in cpu_flags() if f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'))
  return [
      f'- date: {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}',
      f'- machine: `nproc` = {os.cpu_count()}, CPU "{cpu_model()}" ({", ".join(simd)}), '
      f'RAM {ram_gib():.1f} GiB, shared with other jobs (ratios from one run are what count); '
      f'load average at start {os.getloadavg()[0]:.1f}',
      f'- python {platform.python_version()}; {"; ".join(versions)}',
  ]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (which must block until its result is ready) and all samples."""
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)
  return statistics.median(samples), samples


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss():
  """Resets the kernel's resident-set high-water mark (VmHWM) of this process (Linux clear_refs 5)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def current_peak_rss_bytes() -> int:
  """VmHWM: peak RSS since the process started or since the last `reset_peak_rss()`."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError('No VmHWM line in /proc/self/status.')


def run_worker(module: str, args: Sequence[str], timeout: float = 1800, env: dict | None = None) -> dict:
  """Runs `python -m module args...` in a fresh process (with `env` added); it prints one JSON line last."""
  env = dict(os.environ, **(env or {}), PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f'Worker `{module} {" ".join(args)}` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}')
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if not lines:
    raise RuntimeError(f'Worker `{module} {" ".join(args)}` printed no JSON result:\n{proc.stdout[-2000:]}')
  return json.loads(lines[-1])


def adamw_train_step(model, images, labels, weight_decay: float):
  """`model`'s whole training step on one fixed batch (forward, backward, AdamW at 5e-4, BatchNorm statistics
  updated), jitted, and its initial state `(params, opt_state, batch_stats)`."""
  import jax  # noqa: PLC0415 (workers import jax after setting XLA_FLAGS)
  import optax  # noqa: PLC0415

  from spikingformer_jax import models  # noqa: PLC0415
  variables = jax.jit(models.init_variables, static_argnums=0)(model, jax.random.PRNGKey(2), images[:1])
  tx = optax.adamw(5e-4, weight_decay=weight_decay)

  def train_step(params, opt_state, batch_stats):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, loss

  return jax.jit(train_step), (variables['params'], tx.init(variables['params']), variables['batch_stats'])


def flax_batch_norm(train: bool, dtype, name: str):
  """flax's BatchNorm with PyTorch's momentum, for `layers.batch_norm`: the autodiff baseline of batchnorm.py."""
  import flax.linen as nn  # noqa: PLC0415 (workers set XLA_FLAGS before jax starts)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return out


def command_line(module: str) -> str:
  """The command that reproduces this run (the interpreter path tells which venv was used)."""
  return ' '.join([sys.executable, '-m', module] + sys.argv[1:])


def write_report(path: str, lines: Sequence[str]):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  print(f'\nWrote {path}')
