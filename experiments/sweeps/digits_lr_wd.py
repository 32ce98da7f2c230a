"""The digits default: learning rate x weight decay, two seeds (12 trials). Trials scoring below the
median after 5 epochs stop there.

Every trial differs only in optimizer hyperparameters and seeds, so `--vmap=4` can train four of
them as one compiled step: on an accelerator, or for short trials on the CPU (where a vmapped step's
convolutions run slower than separate ones; BENCHMARKS.md, "Sweeps"). On 2 CPU cores, `--parallel=2`.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/digits_sweep --parallel=2
  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/digits_sweep --report
"""
from spikingformer_jax import sweep


def get_sweep():
  return {
      'config': 'experiments/digits.py',
      'overrides': sweep.grid({'optim.lr': [1e-3, 2e-3, 4e-3], 'optim.weight_decay': [0.01, 0.05], 'seed': [0, 1]}),
      'early_stopping': {'epochs': [5], 'min_trials': 4},
  }
