"""DVS128 Gesture, 128x128 event frames, T=16: the reference recipe (`dvs128-gesture/train.py`).

  --config=experiments/dvs128_gesture.py:T=16,data_dir=/data/frames/gesture   (paper: 98.3; T=10: 96.2)
  --config=experiments/dvs128_gesture.py:runlocal              a CPU run on a stand-in (see below)

Arguments: as experiments/cifar10_dvs.py (`T`, `variant` 2-256, `family`, `data_dir`, `dtype`, `runlocal`).
Recipe: CIFAR10-DVS's (lr 1e-3, min 1e-5, warmup 10 epochs from 1e-5, weight decay 0.06, batch 16,
mixup 0.5 with prob 0.5 until epoch 75, label smoothing 0.1, hflip + SNNAugmentWide, 16 heads,
seed 2021) over **192** epochs + 10 cooldown, 11 classes, the official trials split.

Data: `python -m spikingformer_jax.data.prepare --dataset=dvs128_gesture --raw_dir=<DvsGesture>
--out_dir=<dir> --T=<T>`, then `data_dir=<dir>`.
runlocal: no DVS128 Gesture recording is available offline, so runlocal trains on the real N-MNIST
event sample (`nmnist_sample`) as a stand-in for the event pipeline: 10 classes instead of 11, T=4,
a 1-block, 32-wide model, 20 steps of batch 8.
"""
from experiments import cifar10_dvs


def get_config(arg: str = ''):
  args = cifar10_dvs.parse(arg)
  c = cifar10_dvs.recipe(args, dataset='dvs128_gesture', num_classes=11, num_epochs=192)
  if args.runlocal:
    cifar10_dvs.event_standin(c)
  return c
