"""How much arithmetic a zero-skipping kernel could save in the CIFAR 4-384 training step (a bound, not a timing).

Every conv/dense input inside Spikingformer is a 0/1 spike. A kernel that skips zero spikes would do
`density x` the work of the forward product and of the weight gradient (both read the spikes), while
the input gradient (cotangent x weights) stays dense. This script measures, in the forward pass of a
training step (BatchNorm normalising with the batch's statistics, as `benchmarks/model_step.py` runs it),
the density of every product's spike operand, and from it the fraction of the step's product arithmetic
that such an ideal kernel would still do:

    left = sum_p flops_p * (1 + 2 * density_p) / 3   over spike products,  + flops_p for the others,

divided by the step's total. It does so for the benchmark's own input (random normal images, the model
freshly initialised, as `model_step.py`) and, when ../shared is present, for CIFAR-10 test images.

  /tmp/venv/bin/python -m benchmarks.spike_density     # writes benchmarks/results/spike_density.md
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks import common
from spikingformer_jax import models, paths, registry
from spikingformer_jax.analysis import energy
from spikingformer_jax.data import pipeline, sources

MODEL = 'spikingformer-cifar-4-384'


def inputs(batch: int) -> dict[str, np.ndarray]:
  out = {'random normal (the benchmark input)':
         np.asarray(jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3)))}
  cifar_dir = paths.shared_data_dir('cifar10')
  if (cifar_dir / 'test.npz').is_file():
    images = sources.load_npz_images(cifar_dir, 'test', 10).images[:batch].astype(np.float32) / 255.0
    mean, std = np.array(pipeline.CIFAR_MEAN), np.array(pipeline.CIFAR_STD)
    out['CIFAR-10 test images'] = ((images - mean) / std).astype(np.float32)
  return out


def arithmetic_left(report: energy.Report) -> float:
  total = sum(l.flops for l in report.layers)
  left = sum(l.flops if l.spike_rate is None else l.flops * (1 + 2 * l.spike_rate) / 3 for l in report.layers)
  return left / total


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--out', default='benchmarks/results/spike_density.md')
  args = parser.parse_args()

  model = registry.get_model(MODEL, num_classes=10)
  batches = inputs(args.batch)
  variables = models.init_variables(model, jax.random.PRNGKey(2), next(iter(batches.values()))[:1])  # model_step's
  reports = {name: energy.energy_report(model, variables, [dict(image=images)], train=True)
             for name, images in batches.items()}

  lines = [f'# Spike density of the {MODEL} training step (T=4, batch {args.batch})', '',
           f'Command: `{common.command_line("benchmarks.spike_density")}`', '']
  lines += common.machine_lines()
  lines += ['', 'Per product: multiply-accumulates per image over the 4 time steps, and the density of its spike '
            'operand (MAC: a non-spike product, the stem conv on the image and the head).', '']
  names = list(reports)
  first = reports[names[0]]
  rows = [[l.location, f'{l.flops / 1e6:.1f}M'] +
          ['MAC' if r.layers[i].spike_rate is None else f'{r.layers[i].spike_rate:.3f}' for r in reports.values()]
          for i, l in enumerate(first.layers)]
  lines += common.markdown_table(['product', 'MACs/image'] + [f'density, {n}' for n in names], rows)
  lines += ['']
  for name, r in reports.items():
    spike_flops = sum(l.flops for l in r.layers if l.spike_rate is not None)
    density = sum(l.flops * l.spike_rate for l in r.layers if l.spike_rate is not None) / spike_flops
    lines.append(f'- {name}: MAC-weighted spike density {density:.3f}; an ideal zero-skipping kernel would leave '
                 f'{arithmetic_left(r):.3f} of the training step\'s product arithmetic '
                 f'({spike_flops / sum(l.flops for l in r.layers):.4f} of it reads spikes).')
  common.write_report(args.out, lines)


if __name__ == '__main__':
  main()
