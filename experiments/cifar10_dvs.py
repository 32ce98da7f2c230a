"""CIFAR10-DVS, 128x128 event frames, T=16: the reference recipe (`cifar10-dvs/train.py` defaults).

  --config=experiments/cifar10_dvs.py:T=16,data_dir=/data/frames/cifar10_dvs   (paper: 81.3; T=10: 79.9)
  --config=experiments/cifar10_dvs.py:T=16,family=spikformer,data_dir=...
  --config=experiments/cifar10_dvs.py:runlocal                  a CPU run on a stand-in (see below)

Arguments: `T` frames per example (16 or 10 in the paper), `variant` 2-256, `family` spikingformer |
spikingformer-cml | spikformer, `data_dir` the `prepare` output folder, `dtype`, `runlocal`.

Recipe (`cifar10-dvs/train.py`'s defaults): AdamW lr 1e-3, min 1e-5, warmup 10 epochs from 1e-5, timm cosine stepped
per epoch over 96 epochs + 10 cooldown, weight decay 0.06, batch 16, label smoothing 0.1, mixup 0.5 /
cutmix 0 with **prob 0.5** (switch 0.5), off from epoch 75; hflip 0.5 + SNNAugmentWide on all frames;
16 heads, LIF tau 1.5 (the registry's DVS entry), seed 2021. Frames: SpikingJelly split_by='number'
integration of raw counts, first 90% of each class for training.

Data: frames written once by `python -m spikingformer_jax.data.prepare --dataset=cifar10_dvs
--raw_dir=<CIFAR10-DVS> --out_dir=<dir> --T=<T>`, then `data_dir=<dir>`.
runlocal: no CIFAR10-DVS recording is available offline, so runlocal trains on the real N-MNIST
event sample (`nmnist_sample`, ../shared/data/nmnist: 34x34 sensor, 10 digits) as a stand-in for the
event pipeline: T=4 frames, a 1-block, 32-wide model, 20 steps of batch 8.
"""
from spikingformer_jax import configs

from experiments import common


def recipe(args, *, dataset: str, num_classes: int, num_epochs: int):
  """The DVS recipe shared by CIFAR10-DVS and DVS128 Gesture (they differ in data and epochs)."""
  c = configs.base_config()
  c.seed = 2021
  c.model.name = common.model_name(args.family, 'dvs', args.variant)
  c.model.num_classes = num_classes
  c.model.T = args.T
  c.model.dtype = args.dtype
  c.model.overrides.num_heads = 16

  c.data.name = dataset
  c.data.data_dir = args.data_dir
  c.data.T = args.T
  c.data.split_by = 'number'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.augment.hflip = 0.5
  c.data.augment.snn_augment = True

  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = num_epochs
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_lr = 1e-5
  c.optim.warmup_epochs = 10
  c.optim.cooldown_epochs = 10
  c.optim.weight_decay = 0.06
  c.optim.per_epoch_schedule = True

  c.mixup.mixup_alpha = 0.5
  c.mixup.cutmix_alpha = 0.0
  c.mixup.prob = 0.5
  c.mixup.switch_prob = 0.5
  c.mixup.off_epoch = 75
  c.label_smoothing = 0.1

  c.log_every_steps = 50
  c.checkpoint.every_steps = 1000
  c.metric = 'top1'
  return c


def event_standin(c):
  """runlocal for the DVS configs: the real N-MNIST sample, T=4, a tiny model (see the docstring)."""
  common.shrink_for_cpu(c, steps=20, batch=8, train_examples=160, eval_examples=48)
  c.data.name = 'nmnist_sample'
  c.data.data_dir = ''
  c.data.T = c.model.T = 4
  c.model.num_classes = 10
  return c


def parse(arg: str):
  return common.parse_args(arg, T=16, variant='2-256', family='spikingformer', data_dir='', dtype='float32')


def get_config(arg: str = ''):
  args = parse(arg)
  c = recipe(args, dataset='cifar10_dvs', num_classes=10, num_epochs=96)
  if args.runlocal:
    event_standin(c)
  return c
