"""The embedded default: a small Spikingformer on scikit-learn's 8x8 handwritten digits (real data, no download).

  python -m spikingformer_jax.main --config=experiments/digits.py --workdir=/tmp/spikingformer-digits
"""
from experiments import common
from spikingformer_jax import configs


def get_config(arg: str = ''):
  args = common.parse_args(arg)
  c = configs.base_config()
  c.model.name = 'spikingformer-tiny'
  c.model.num_classes = 10
  c.data.name = 'digits'
  c.batch_size = 32
  c.eval_batch_size = 120
  c.num_epochs = 30
  c.optim.lr = 2e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_lr = 1e-5
  c.optim.warmup_epochs = 2
  c.optim.weight_decay = 0.01
  c.optim.per_epoch_schedule = False
  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.checkpoint.every_steps = 500
  c.metric = 'top1'
  if args.runlocal:
    c.num_epochs = 2
  return c
