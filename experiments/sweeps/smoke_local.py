"""A CPU-sized sweep to try the machinery: the runlocal CIFAR-10 config at two learning rates.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/smoke_local.py --root=/tmp/sweep_smoke
"""
from spikingformer_jax import sweep


def get_sweep():
  return {'config': 'experiments/cifar10.py:runlocal',
          'overrides': sweep.grid({'optim.lr': [5e-4, 2e-3]})}
