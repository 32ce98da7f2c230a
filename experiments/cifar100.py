"""CIFAR-100, 32x32, T=4: the reference recipe (`cifar100/cifar100.yml`), CIFAR-10's except 8 heads.

  --config=experiments/cifar100.py:variant=4-384                  Spikingformer-4-384 (paper: 79.21, 400 epochs)
  --config=experiments/cifar100.py:variant=4-384,family=spikformer
  --config=experiments/cifar100.py:runlocal                       a CPU run (data: see below)

Arguments and recipe: as experiments/cifar10.py (lr 5e-4, min 1e-5, warmup 20 epochs from 1e-5,
400 + 10 epochs, weight decay 0.06, batch 64, mixup 0.5 until epoch 200, label smoothing 0.1,
rand-m9-n1-mstd0.4-inc1, erasing 0.25), with 100 classes and the yml's `num_heads: 8`.

Data: tfds `cifar100` (see spikingformer_jax/data/README.md).
runlocal: a 1-block, 32-wide model, 20 steps of batch 8 on tfds `cifar100`. No real CIFAR-100
sample exists offline, so without prepared data it needs `tfds.testing.mock_data` around the run
(the smoke suite does that: random images, i.e. a pipeline check only).
"""
from experiments import cifar10, common


def get_config(arg: str = ''):
  args = common.parse_args(arg, variant='4-384', family='spikingformer', dtype='float32')
  c = cifar10.recipe(args, num_classes=100, num_heads=8)
  c.data.name = 'cifar100'
  if args.runlocal:
    common.shrink_for_cpu(c, steps=20, batch=8, train_examples=256, eval_examples=64)
  return c
