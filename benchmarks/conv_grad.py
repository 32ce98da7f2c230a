"""The tokenizer's 3x3 convolution and its two gradients: XLA:CPU with and without YNNPACK, and PyTorch.

The CIFAR stem runs 3x3 convs on T*B = 64 images of 32x32 (half of the model's FLOPs). This times, on
the stage-2 shape (96 -> 192 channels), the forward conv, d/dx and d/dw in XLA with its default
convolution kernels (YNNPACK), in XLA with `cpu_runtime.CPU_FLAGS` (Eigen; what main.py applies), and in
PyTorch. The two XLA settings need separate processes (XLA reads its flags once); they run as
interleaved workers.

  /tmp/bench-venv/bin/python -m benchmarks.conv_grad     # writes benchmarks/results/conv_grad.md
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from spikingformer_jax import cpu_runtime

SHAPE = (64, 32, 32, 96, 192)  # T*B, H, W, C_in, C_out


def conv3x3(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _inputs():
  n, h, w, c_in, c_out = SHAPE
  rng = np.random.default_rng(0)
  x = (rng.random((n, h, w, c_in)) < 0.2).astype(np.float32)  # Spikes, as the stem convs see them.
  kernel = (rng.standard_normal((3, 3, c_in, c_out)) * 0.05).astype(np.float32)
  g = rng.standard_normal((n, h, w, c_out)).astype(np.float32)
  return x, kernel, g


def xla_worker(args) -> dict:
  """One process: XLA's forward, d/dx and d/dw, with or without the project's CPU flags."""
  import os
  if args.cpu_flags:
    os.environ['XLA_FLAGS'] = cpu_runtime.merged(os.environ.get('XLA_FLAGS', ''))
  x, kernel, g = (jnp.asarray(a) for a in _inputs())
  forward = jax.jit(conv3x3)
  grad_x = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv3x3(x, k), x)[1](g)[0])
  grad_w = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv3x3(x, k), k)[1](g)[0])
  calls = {'forward': lambda: forward(x, kernel).block_until_ready(),
           'd/dx': lambda: grad_x(x, kernel, g).block_until_ready(),
           'd/dw': lambda: grad_w(x, kernel, g).block_until_ready()}
  return {name: common.median_time(call, args.calls, warmup=1)[1] for name, call in calls.items()}


def torch_times(calls_per_op: int) -> dict:
  import torch
  x, kernel, g = _inputs()
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  kt = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
  gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
  calls = {'forward': lambda: torch.nn.functional.conv2d(xt, kt, padding=1),
           'd/dx': lambda: torch.nn.grad.conv2d_input(xt.shape, kt, gt, padding=1),
           'd/dw': lambda: torch.nn.grad.conv2d_weight(xt, kt.shape, gt, padding=1)}
  return {name: common.median_time(call, calls_per_op, warmup=1)[1] for name, call in calls.items()}


def run(args):
  n, h, w, c_in, c_out = SHAPE
  settings = {'XLA defaults (YNNPACK)': [], 'XLA with cpu_runtime.CPU_FLAGS (Eigen)': ['--cpu-flags'], 'PyTorch': None}
  samples = {}
  for _ in range(args.rounds):
    for setting, worker_args in settings.items():
      if worker_args is None:
        result = torch_times(args.calls)
      else:
        result = common.run_worker('benchmarks.conv_grad', ['--worker', '--calls', str(args.calls)] + worker_args)
      for op, times in result.items():
        samples.setdefault((setting, op), []).extend(times)
  gflop = 2 * n * h * w * c_in * c_out * 9 / 1e9
  rows = [[setting, op, f'{statistics.median(s) * 1e3:.0f}', f'{min(s) * 1e3:.0f}',
           f'{gflop / statistics.median(s):.0f}'] for (setting, op), s in samples.items()]
  lines = ['# 3x3 conv and its gradients on CPU: XLA (YNNPACK / Eigen) vs PyTorch (CIFAR stem stage 2)', '',
           f'Command: `{common.command_line("benchmarks.conv_grad")}`', '']
  lines += common.machine_lines()
  lines += ['', f'Input {list(SHAPE[:4])} (0/1 spikes), kernel 3x3x{c_in}x{c_out}, float32, {gflop:.1f} GFLOP per '
            f'op; {args.rounds} interleaved rounds x {args.calls} calls, each XLA setting in its own process.', '']
  lines += common.markdown_table(['setting', 'op', 'median ms', 'min ms', 'GFLOP/s (median)'], rows)
  common.write_report(args.out, lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--worker', action='store_true', help='internal: time XLA in this process')
  parser.add_argument('--cpu-flags', action='store_true', help='worker: apply cpu_runtime.CPU_FLAGS')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--out', default=f'{common.REPO_ROOT}/benchmarks/results/conv_grad.md')
  args = parser.parse_args()
  if args.worker:
    import json
    print(json.dumps(xla_worker(args)))
  else:
    run(args)


if __name__ == '__main__':
  main()
