"""The tokenizer's 3x3 convolution and its two gradients: XLA:CPU vs PyTorch, and a faster weight gradient.

The CIFAR stem runs 3x3 convs on T*B = 64 images of 32x32 (half of the model's FLOPs). This times, side
by side on the stage-2 shape (96 -> 192 channels), the forward conv, d/dx and d/dw in XLA and in PyTorch,
and d/dw of `layers.conv3x3` (the custom_vjp used by `layers.ConvBN`: nine shifted matmuls).

  /tmp/bench-venv/bin/python -m benchmarks.conv_grad     # writes benchmarks/results/conv_grad.md
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from spikingformer_jax import layers

SHAPE = (64, 32, 32, 96, 192)  # T*B, H, W, C_in, C_out


def conv3x3(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def run(args):
  import torch
  n, h, w, c_in, c_out = SHAPE
  rng = np.random.default_rng(0)
  x = (rng.random((n, h, w, c_in)) < 0.2).astype(np.float32)  # Spikes, as the stem convs see them.
  kernel = (rng.standard_normal((3, 3, c_in, c_out)) * 0.05).astype(np.float32)
  xj, kj = jnp.asarray(x), jnp.asarray(kernel)
  forward = jax.jit(conv3x3)
  g = forward(xj, kj)
  grad_x = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv3x3(x, k), x)[1](g)[0])
  grad_w = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv3x3(x, k), k)[1](g)[0])
  grad_w_shifted = jax.jit(lambda x, k, g: jax.vjp(lambda k: layers.conv3x3(x, k), k)[1](g)[0])
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  kt = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
  gt = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2).contiguous()
  calls = {
      'XLA forward': lambda: forward(xj, kj).block_until_ready(),
      'XLA d/dx': lambda: grad_x(xj, kj, g).block_until_ready(),
      'XLA d/dw': lambda: grad_w(xj, kj, g).block_until_ready(),
      'layers.conv3x3 d/dw (9 shifted matmuls)': lambda: grad_w_shifted(xj, kj, g).block_until_ready(),
      'PyTorch forward': lambda: torch.nn.functional.conv2d(xt, kt, padding=1),
      'PyTorch d/dx': lambda: torch.nn.grad.conv2d_input(xt.shape, kt, gt, padding=1),
      'PyTorch d/dw': lambda: torch.nn.grad.conv2d_weight(xt, kt.shape, gt, padding=1),
  }
  reference = np.asarray(grad_w(xj, kj, g))
  conv3x3_err = float(np.max(np.abs(np.asarray(grad_w_shifted(xj, kj, g)) - reference)) / np.max(np.abs(reference)))
  samples = {name: [] for name in calls}
  for _ in range(args.rounds):
    for name, call in calls.items():
      samples[name] += common.median_time(call, args.calls, warmup=1)[1]
  gflop = 2 * n * h * w * c_in * c_out * 9 / 1e9
  rows = [[name, f'{statistics.median(s) * 1e3:.0f}', f'{min(s) * 1e3:.0f}', f'{gflop / statistics.median(s):.0f}']
          for name, s in samples.items()]
  lines = ['# 3x3 conv gradients on CPU: XLA vs PyTorch (CIFAR stem stage 2)', '',
           f'Command: `{common.command_line("benchmarks.conv_grad")}`', '']
  lines += common.machine_lines()
  lines += ['', f'Input {list(SHAPE[:4])} (0/1 spikes), kernel 3x3x{c_in}x{c_out}, float32, {gflop:.1f} GFLOP per '
            f'op; {args.rounds} interleaved rounds x {args.calls} calls. layers.conv3x3 vs XLA d/dw: max relative '
            f'difference {conv3x3_err:.1e} (summation order).', '']
  lines += common.markdown_table(['op', 'median ms', 'min ms', 'GFLOP/s (median)'], rows)
  common.write_report(args.out, lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--out', default=f'{common.REPO_ROOT}/benchmarks/results/conv_grad.md')
  run(parser.parse_args())


if __name__ == '__main__':
  main()
