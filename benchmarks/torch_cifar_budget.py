"""The reference's model in PyTorch, trained on the CIFAR-10 sample for a wall-time budget with the recipe of
`experiments/cifar10.py:cpu`: the side by side with `python -m spikingformer_jax.main
--config=experiments/cifar10.py:cpu`.

Spikingformer-2-256 (`torch_reference.Spikingformer`, dim 256, 2 blocks, 8 heads, T=4; the reference's LIF
equations, `lif='spikingjelly'` for SpikingJelly's own neuron), batch 32, AdamW at 5e-4 with weight decay
0.06 on all but the 1-D parameters (timm's rule), label smoothing 0.1, horizontal flips only, seed 42, on
the 10,000 training images of ../shared/data/cifar10 (reshuffled each epoch); evaluated once, when the
budget is spent, on its 2,000 test images with BatchNorm's running statistics. The budget counts from
the start of training (model building included), as `time_budget_minutes` does.

`--schedule=cosine`: the recipe's cosine from 5e-4 to its min_lr 1e-5, read before each step at the
fraction of the budget spent (what the JAX trainer does with a time budget); `constant`: 5e-4 throughout.

The script reads the sample and its normalisation itself rather than through spikingformer_jax (paths,
data.pipeline): the PyTorch process then loads nothing of the JAX stack, and its peak RSS is PyTorch's own.

  /tmp/bench-venv/bin/python -m benchmarks.torch_cifar_budget --minutes 10 --schedule cosine
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import numpy as np
import torch
from torch import nn

from benchmarks import torch_reference

MEAN, STD = np.float32([0.4914, 0.4822, 0.4465]), np.float32([0.2470, 0.2435, 0.2616])  # pipeline.CIFAR_*
PEAK_LR, MIN_LR, WEIGHT_DECAY, LABEL_SMOOTHING = 5e-4, 1e-5, 0.06, 0.1


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 3, 32, 32] float32, normalised; labels [N] int64) of the shared CIFAR-10 sample."""
  shared = os.environ.get('SPIKINGFORMER_SHARED') or os.path.join(os.pardir, 'shared')
  path = os.path.join(shared, 'data', 'cifar10', f'{split}.npz')
  if not os.path.isfile(path):
    raise SystemExit(f'{path} not found: this benchmark trains on the shared CIFAR-10 sample '
                     '(set SPIKINGFORMER_SHARED to the folder that holds data/cifar10).')
  with np.load(path) as f:
    images = (f['images'].astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), f['labels'].astype(np.int64)


def cosine_lr(progress: float) -> float:
  """timm's cosine from PEAK_LR to MIN_LR at `progress` in [0, 1] of the schedule."""
  return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_model(lif: str) -> nn.Module:
  torch.manual_seed(42)
  model = torch_reference.Spikingformer(num_classes=10, dim=256, depth=2, heads=8, T=4, lif=lif)
  nn.init.trunc_normal_(model.head.weight, std=0.02)  # the reference's _init_weights for Linear layers
  nn.init.zeros_(model.head.bias)
  return model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.AdamW([{'params': decay, 'weight_decay': WEIGHT_DECAY},
                            {'params': no_decay, 'weight_decay': 0.0}], lr=PEAK_LR)


def batches(images: np.ndarray, labels: np.ndarray, batch: int, rng: np.random.Generator):
  """Endless shuffled batches, each image flipped left-right with probability 0.5."""
  while True:
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch + 1, batch):
      idx = order[start:start + batch]
      x = images[idx]
      flip = rng.random(batch) < 0.5
      x[flip] = x[flip, :, :, ::-1]
      yield torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels[idx])


@torch.no_grad()
def top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 200) -> float:
  model.eval()
  correct = 0
  for start in range(0, len(images), batch):
    logits = model(torch.from_numpy(images[start:start + batch]))
    correct += int((logits.argmax(1) == torch.from_numpy(labels[start:start + batch])).sum())
  return 100.0 * correct / len(images)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--minutes', type=float, default=10.0)
  parser.add_argument('--schedule', choices=('cosine', 'constant'), default='cosine')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--lif', choices=('builtin', 'spikingjelly'), default='builtin')
  args = parser.parse_args()
  train_x, train_y = load_split('train')
  test_x, test_y = load_split('test')
  budget_s = 60.0 * args.minutes
  started = time.perf_counter()
  model = make_model(args.lif)
  optimizer = make_optimizer(model)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
  data = batches(train_x, train_y, args.batch, np.random.default_rng(42))
  steps, step_times = 0, []
  while (progress := (time.perf_counter() - started) / budget_s) < 1.0:
    lr = cosine_lr(progress) if args.schedule == 'cosine' else PEAK_LR
    for group in optimizer.param_groups:
      group['lr'] = lr
    images, labels = next(data)
    step_start = time.perf_counter()
    model.train()
    loss = loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    step_times.append(time.perf_counter() - step_start)
    steps += 1
    if steps % 50 == 0:
      print(f'step {steps}: loss {loss.item():.3f} lr {lr:.2e} ({step_times[-1]:.2f} s/step)', flush=True)
  train_s = time.perf_counter() - started
  result = dict(schedule=args.schedule, lif=args.lif, minutes=args.minutes, steps=steps,
                images_seen=steps * args.batch, median_step_s=round(float(np.median(step_times)), 3),
                train_s=round(train_s, 1), top1=top1(model, test_x, test_y),
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                torch=torch.__version__, threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
