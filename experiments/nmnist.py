"""N-MNIST, 34x34 event frames: the DVS recipe on the one event dataset with real data offline.

The reference trains no N-MNIST model; this config is ours. It runs the CIFAR10-DVS recipe
(experiments/cifar10_dvs.py: lr 1e-3, warmup 10, weight decay 0.06, batch 16, mixup 0.5 with prob
0.5 until epoch 75, hflip + SNNAugmentWide, 16 heads, tau 1.5, seed 2021) for 96 + 10 epochs on the
2-256 DVS model, whose four 2x poolings turn 34x34 into 3x3 tokens.

  --config=experiments/nmnist.py:data_dir=/data/N-MNIST          raw Train/<digit>/*.bin (or prepared frames)
  --config=experiments/nmnist.py:sample                           the 300/50 real sample in ../shared/data/nmnist
  --config=experiments/nmnist.py:cpu                              10 minutes of CPU on that sample (T=4)
  --config=experiments/nmnist.py:runlocal                         a CPU smoke run on that sample (T=4, tiny model)

Arguments: `T` (16; 4 with `cpu`), `variant` 2-256, `family`, `data_dir`, `dtype`, `sample`, `cpu`, `runlocal`.
`cpu`: the recipe cut to 10 minutes of wall time (experiments/common.py `cpu_budget`: the cosine from lr 1e-3
to 1e-5 spread over the budget, flips only, no mixup, the sparse spike kernels), batch 16, trained on the
sample's 300 recordings and evaluated on its 50 test recordings.
N-MNIST digits are not mirror-symmetric, but the recipe's hflip is kept so this stays the DVS
recipe; pass --config.data.augment.hflip=0.0 to drop it.
"""
from experiments import cifar10_dvs, common


def get_config(arg: str = ''):
  args = common.parse_args(arg, T=0, variant='2-256', family='spikingformer', data_dir='', dtype='float32',
                           sample=False, cpu=False)
  args.T = args.T or (4 if args.cpu else 16)
  c = cifar10_dvs.recipe(args, dataset='nmnist_sample' if args.sample or args.cpu else 'nmnist', num_classes=10,
                         num_epochs=96)
  if args.cpu:
    common.cpu_budget(c, minutes=10.0, batch=16)
  if args.runlocal:
    cifar10_dvs.event_standin(c)
  return c
