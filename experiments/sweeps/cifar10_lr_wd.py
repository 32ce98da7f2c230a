"""CIFAR-10 4-384: learning rate x weight decay around the reference (5e-4, 0.06), two seeds.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/cifar10_lr_wd.py --root=/runs/cifar10_lr_wd
"""
from spikingformer_jax import sweep


def get_sweep():
  return {
      'config': 'experiments/cifar10.py:variant=4-384',
      'overrides': sweep.grid({'optim.lr': [2.5e-4, 5e-4, 1e-3],
                               'optim.weight_decay': [0.03, 0.06],
                               'seed': [42, 43]}),
  }
