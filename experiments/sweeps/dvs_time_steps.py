"""CIFAR10-DVS: the paper's two time-step settings (T=10, T=16) for each model family.

The frames are prepared once per T (`spikingformer_jax.data.prepare --T=10` and `--T=16` into the
same out_dir, here /data/frames/cifar10_dvs); `data.T` and `model.T` move together.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/dvs_time_steps.py --root=/runs/dvs_T
"""
FAMILIES = ('spikingformer', 'spikingformer-cml', 'spikformer')


def get_sweep():
  runs = [{'model.name': f'{family}-dvs-2-256', 'model.T': t, 'data.T': t} for family in FAMILIES for t in (10, 16)]
  return {'config': 'experiments/cifar10_dvs.py:T=16,data_dir=/data/frames/cifar10_dvs', 'overrides': runs}
