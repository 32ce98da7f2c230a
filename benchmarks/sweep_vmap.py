"""K digits trials as one vmapped group against the same K trials run one after another, side by side.

Both contenders are the sweep driver as users run it, on one sweep file (the digits default at K
learning-rate x seed combinations, `--steps` steps each): `python -m spikingformer_jax.sweep` plain
(K `spikingformer_jax.main` processes in turn) and with `--vmap=K` (one `spikingformer_jax.trials`
process), each with a fresh persistent compilation cache (the command line keeps one, compile_cache.py:
the separate runs of the two seeds of a learning rate share their compiled step, as a user's first
sweep would). Each runs in a fresh worker process that reports the wall time of the whole sweep, the
peak RSS of its largest process (getrusage of the finished children), the trials' steady training
throughput (the median images/s of their metrics.jsonl after the first, compiling, interval) and
their final top-1. A second table times one 3x3 convolution (forward and both gradients) of K trials'
own kernels, vmapped (XLA: one grouped convolution) against K ordinary ones in one program, which is
where the vmapped step loses on the CPU.

  python -m benchmarks.sweep_vmap --trials 8 --steps 88 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

LRS = (1e-3, 2e-3, 4e-3, 8e-3)


def write_sweep(folder: str, trials: int, steps: int) -> str:
  seeds = list(range((trials + len(LRS) - 1) // len(LRS)))
  overrides = [{'optim.lr': lr, 'seed': seed, 'total_steps': steps} for seed in seeds for lr in LRS][:trials]
  path = os.path.join(folder, 'sweep.py')
  with open(path, 'w') as f:
    f.write(f'def get_sweep():\n  return {{"config": "experiments/digits.py", "overrides": {overrides!r}}}\n')
  return path


def worker(mode: str, sweep_path: str, root: str, trials: int):
  """Runs the sweep (plain or --vmap) and prints one JSON line with its figures."""
  from spikingformer_jax import sweep, sweep_results  # noqa: PLC0415
  args = [sys.executable, '-m', 'spikingformer_jax.sweep', f'--sweep={sweep_path}', f'--root={root}']
  if mode == 'vmapped':
    args.append(f'--vmap={trials}')
  start = time.perf_counter()
  proc = subprocess.run(args, cwd=common.REPO_ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f'{mode} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  results = sweep_results.collect([(r.name, {}, r.workdir) for r in sweep.expand(sweep_path, root)], 'top1', root)
  print(json.dumps({
      'wall_s': wall, 'peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
      'images_per_sec': [r.images_per_sec for r in results], 'top1': {r.name: r.final for r in results},
      'loss': {r.name: r.loss_curve for r in results}, 'status': [r.status for r in results]}))


def conv_rows(trials: int, repeats: int = 10) -> list[tuple]:
  """A digits-stem-sized 3x3 convolution with per-trial kernels: vmapped vs the K convolutions one by one."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  def grads(x, w):
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)

  x = jax.random.normal(jax.random.PRNGKey(0), (trials, 128, 8, 8, 32))  # T x batch 32, 8x8, 32 channels
  w = 0.01 * jax.random.normal(jax.random.PRNGKey(1), (trials, 3, 3, 32, 64))
  vmapped = jax.jit(jax.vmap(grads))
  one_by_one = jax.jit(lambda x, w: [grads(x[i], w[i]) for i in range(trials)])
  times = {}
  for _ in range(2):  # interleaved rounds; the last one counts
    for name, fn in (('vmapped (one grouped convolution)', vmapped), ('one by one in one program', one_by_one)):
      times[name] = common.median_time(lambda: jax.block_until_ready(fn(x, w)), repeats)[0]  # noqa: B023
  base = times['one by one in one program']
  return [(name, f'{1000 * t:.0f}', f'{t / base:.2f}') for name, t in times.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--trials', type=int, default=8)
  parser.add_argument('--steps', type=int, default=88, help='training steps per trial (44 per digits epoch)')
  parser.add_argument('--rounds', type=int, default=1, help='alternating sequential/vmapped rounds')
  parser.add_argument('--out', default=os.path.join(common.REPO_ROOT, 'benchmarks', 'results', 'sweep_vmap.md'))
  parser.add_argument('--worker', choices=('sequential', 'vmapped'), help=argparse.SUPPRESS)
  parser.add_argument('--sweep', help=argparse.SUPPRESS)
  parser.add_argument('--root', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.sweep, args.root, args.trials)
    return
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from spikingformer_jax import cpu_runtime  # noqa: PLC0415 (the trainer's XLA:CPU options, for conv_rows)
  cpu_runtime.apply_cpu_flags()
  lines = ['# K digits trials: one vmapped step vs one run after another', '', *common.machine_lines(),
           f'- command: `{common.command_line("benchmarks.sweep_vmap")}`', '']
  env = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': ''}
  measured = {'sequential': [], 'vmapped': []}
  with tempfile.TemporaryDirectory() as tmp:
    sweep_path = write_sweep(tmp, args.trials, args.steps)
    for r in range(args.rounds):
      for mode in ('sequential', 'vmapped'):
        root = os.path.join(tmp, f'{mode}-{r}')
        cache = {'SPIKINGFORMER_COMPILE_CACHE': os.path.join(tmp, f'cache-{mode}-{r}')}
        result = common.run_worker('benchmarks.sweep_vmap', ['--worker', mode, '--sweep', sweep_path, '--root', root,
                                                             '--trials', str(args.trials)], timeout=7200,
                                   env=dict(env, **cache))
        assert set(result['status']) == {'finished'}, result['status']
        measured[mode].append(result)
        print(mode, r, {k: v for k, v in result.items() if k != 'top1'}, flush=True)
  rows = []
  for mode in ('sequential', 'vmapped'):
    runs = measured[mode]
    wall = statistics.median(m['wall_s'] for m in runs)
    rss = max(m['peak_rss_gib'] for m in runs)
    per_trial = statistics.median(v for m in runs for v in m['images_per_sec'])
    total = per_trial * (args.trials if mode == 'vmapped' else 1)
    rows.append((mode, wall, rss, per_trial, total))
  seq, vm = rows
  header = ['how the K trials run', 'sweep wall time (s)', 'peak RSS of a process (GiB)',
            'steady images/s per trial', 'steady images/s, all trials']
  how = {'sequential': f'{args.trials} `main` processes in turn',
         'vmapped': f'one `trials` process, --vmap={args.trials}'}
  table = [(how[m], f'{w:.1f}', f'{r:.2f}', f'{p:.0f}', f'{t:.0f}') for m, w, r, p, t in rows]
  table.append(('ratio vmapped / sequential', f'{vm[1] / seq[1]:.2f}', f'{vm[2] / seq[2]:.2f}', f'{vm[3] / seq[3]:.2f}',
                f'{vm[4] / seq[4]:.2f}'))
  top1 = [(n, measured['sequential'][0]['top1'][n], measured['vmapped'][0]['top1'][n])
          for n in measured['sequential'][0]['top1']]
  lines += [f'{args.trials} trials of the digits default (spikingformer-tiny, T=4, batch 32), {args.steps} steps '
            f'each, {args.rounds} round(s) of each contender, alternating, each with a fresh compilation cache.', '']
  lines += common.markdown_table(header, table)
  lines += ['', f'A 3x3 convolution, forward and both gradients, of {args.trials} trials\' own kernels on '
            '[128, 8, 8, 32] inputs (the digits stem\'s size), median of 10 calls:', '']
  lines += common.markdown_table(['how', 'ms', 'ratio'], conv_rows(args.trials))
  seq_loss, vm_loss = measured['sequential'][0]['loss'], measured['vmapped'][0]['loss']
  steps = [s for s, _ in next(iter(seq_loss.values()))]
  drift = [(s, max(abs(vm_loss[n][i][1] - seq_loss[n][i][1]) / seq_loss[n][i][1] for n in seq_loss))
           for i, s in enumerate(steps)]
  lines += ['', 'The largest relative difference of a trial\'s logged training loss between the two ways, by step '
            '(vmapped products sum in another order; with Adam\'s eps = 1e-8 and spike thresholds the rounding '
            'differences grow over a run):', '']
  lines += common.markdown_table(['step', 'max relative loss difference'], [(s, f'{d:.1e}') for s, d in drift])
  lines += ['', 'Final top-1 of each trial both ways:', '']
  lines += common.markdown_table(['trial', 'sequential', 'vmapped'], [(n, f'{a:.4f}', f'{b:.4f}') for n, a, b in top1])
  common.write_report(args.out, lines)


if __name__ == '__main__':
  main()
