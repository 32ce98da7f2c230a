"""Paired A/B of the CIFAR 4-384 training step in ONE process: shipped default vs the previous default.

On the shared 2-core machine whole-process timings of model_step.py swing 2x between rounds; here both
steps are compiled in the same process and their calls alternate, so each pair sees the same load.
Previous default = XLA's own conv kernel gradient and autodiff through the LIF scan (patched in at trace
time). Prints per-pair step times and the median ratio.

  /tmp/bench-venv/bin/python -m benchmarks.model_step_ab --pairs 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from spikingformer_jax import layers, models, neurons

MODEL = 'spikingformer-cifar-4-384'


def compiled_train_step(batch: int):
  model = models.get_model(MODEL)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
  variables = models.init_variables(model, jax.random.PRNGKey(2), images[:1])
  tx = optax.adamw(5e-4, weight_decay=0.05)

  def train_step(params, opt_state, batch_stats):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, loss

  state = (variables['params'], tx.init(variables['params']), variables['batch_stats'])
  return jax.jit(train_step).lower(*state).compile(), state


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', type=int, default=4)
  parser.add_argument('--batch', type=int, default=16)
  args = parser.parse_args()
  steps = {'shipped': compiled_train_step(args.batch)}
  shipped_lif, shipped_conv = neurons.lif, layers.conv3x3
  neurons.lif = lambda x, cfg=neurons.LIFConfig(): neurons._run(x, cfg, 1.0 / cfg.tau, cfg.decay_input)
  layers.conv3x3 = layers._conv3x3_xla
  steps['previous'] = compiled_train_step(args.batch)
  neurons.lif, layers.conv3x3 = shipped_lif, shipped_conv
  times = {name: [] for name in steps}
  for i in range(args.pairs + 1):  # The first pair warms up.
    for name, (step, state) in (steps.items() if i % 2 else reversed(steps.items())):
      start = time.perf_counter()
      jax.block_until_ready(step(*state))
      if i:
        times[name].append(time.perf_counter() - start)
  ratios = [p / s for p, s in zip(times['previous'], times['shipped'])]
  for name, t in times.items():
    print(f'{name}: ' + ', '.join(f'{x:.2f}' for x in t) + f' s (median {statistics.median(t):.2f})')
  print(f'previous / shipped step time per pair: ' + ', '.join(f'{r:.2f}' for r in ratios)
        + f' (median {statistics.median(ratios):.2f}x)')


if __name__ == '__main__':
  main()
