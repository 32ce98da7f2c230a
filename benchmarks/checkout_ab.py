"""The CIFAR 4-384 training step of this checkout against another git revision, side by side.

  python -m benchmarks.checkout_ab --base=REV [--pairs 4] [-- extra model_step worker flags]

A worktree of REV is made in a temporary folder; each pair runs `benchmarks.model_step`'s JAX worker
(a fresh process: the same step, the same flags) once from REV and once from this checkout, in
alternating order, so both see the same load. Prints the per-pair step times, the median ratio
(this / base; < 1 is faster) and the peak RSS of each. Needs only the main venv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks import common


def worker(tree: str, flags: list[str]) -> dict:
  cmd = [sys.executable, '-m', 'benchmarks.model_step', '--worker', 'jax', *flags]
  env = dict(os.environ, PYTHONPATH=tree)
  out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True, timeout=3600)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--base', required=True, help='git revision to compare against')
  parser.add_argument('--pairs', type=int, default=4)
  parser.add_argument('flags', nargs='*', help='model_step worker flags, e.g. --steps 3 --spike-kernels')
  args = parser.parse_args()
  flags = args.flags or ['--steps', '3']
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = os.path.join(tmp, 'base')
    subprocess.run(['git', 'worktree', 'add', '--detach', base_tree, args.base], cwd=common.REPO_ROOT,
                   check=True, capture_output=True)
    try:
      print('\n'.join(common.machine_lines()))
      ratios, rows = [], []
      for pair in range(args.pairs):
        order = [('base', base_tree), ('this', common.REPO_ROOT)]
        results = {name: worker(tree, flags) for name, tree in (order if pair % 2 == 0 else order[::-1])}
        times = {k: statistics.median(v['step_s']) for k, v in results.items()}
        ratios.append(times['this'] / times['base'])
        rows.append([pair, f'{times["base"]:.3f}', f'{times["this"]:.3f}', f'{ratios[-1]:.3f}',
                     f'{results["base"]["peak_rss"] / 1e9:.2f}', f'{results["this"]["peak_rss"] / 1e9:.2f}'])
      print('\n'.join(common.markdown_table(
          ['pair', f'{args.base} s/step', 'this s/step', 'this / base', 'base peak RSS GB', 'this peak RSS GB'],
          rows)))
      print(f'median ratio this / {args.base}: {statistics.median(ratios):.3f} over {args.pairs} pairs '
            f'(flags: {" ".join(flags)})')
    finally:
      subprocess.run(['git', 'worktree', 'remove', '--force', base_tree], cwd=common.REPO_ROOT, check=False,
                     capture_output=True)


if __name__ == '__main__':
  main()
