"""ImageNet-1k, 224x224, T=4: the reference recipe (`imagenet/imagenet.yml`, `imagenet/train.py`).

  --config=experiments/imagenet.py:variant=8-768                  Spikingformer-8-768 (paper: 75.85 top-1)
  --config=experiments/imagenet.py:variant=8-512,family=spikformer
  --config=experiments/imagenet.py:cpu                            10 CPU minutes on the real 50-image sample
  --config=experiments/imagenet.py:runlocal                       a CPU pipeline check (see below)

Arguments: `variant` 8-384 | 8-512 | 8-768, `family` spikingformer | spikingformer-cml (the paper's
Spikingformer†) | spikformer, `dtype` float32 | bfloat16, `cpu`, `runlocal`.

Recipe (`imagenet/imagenet.yml`): AdamW lr 5e-4, min 1e-5, warmup 20 epochs from 1e-6, timm cosine stepped per
epoch over 300 epochs + 10 cooldown, weight decay 0.05 (none on 1-D params), label smoothing 0.1,
mixup 0.8 / cutmix 1.0 (prob 1, switch 0.5, never off), RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25, hflip 0.5, centre-square resize to 224, eval resize 224 (crop_pct 1), 8 heads, seed 42.
Global batch: the yml's 36 per GPU x 8 GPUs = 288, which the 8-512 log confirms (4,448 it/epoch);
the 8-768 log shows 24 per GPU, i.e. **192**, so 8-768 uses 192 and 8-384/8-512 use 288. The
reference trains with fp16 AMP; `dtype=bfloat16` (the default here) is its accelerator counterpart
(parameters stay float32).

Data: tfds `imagenet2012` (ArrayRecord; see spikingformer_jax/data/README.md to prepare it).

runlocal: a 1-block, 32-wide model at 64x64, 20 steps of batch 8, float32. Data: the real 50-image
sample `../shared/data/imagenet_sample/sample224.npz` through the 'npz' source. That source reads
`<data_dir>/<split>.npz`, so runlocal links train.npz and test.npz to the sample in a temp folder
(`common.staged_sample_dir`): train and test are the same 50 images, a pipeline check, not an
accuracy. Without the sample, runlocal keeps tfds `imagenet2012` (prepared, or under
`tfds.testing.mock_data` as in the smoke suite).

cpu: runlocal's model and 64x64 images, trained for 10 minutes (experiments/common.py `cpu_budget`,
batch 8) on the sample's first 25 images and evaluated on the other 25. The sample holds one image per
class, so the held-out images' classes are never trained on: the accuracy is 0 by construction, and the
run shows the pipeline and the speed, not learning.
"""
from spikingformer_jax import configs

from experiments import common

BATCH = {'8-384': 288, '8-512': 288, '8-768': 192}


def get_config(arg: str = ''):
  args = common.parse_args(arg, variant='8-768', family='spikingformer', dtype='bfloat16', cpu=False)
  c = configs.base_config()
  c.seed = 42
  c.model.name = common.model_name(args.family, '', args.variant)
  c.model.num_classes = 1000
  c.model.T = 4
  c.model.dtype = args.dtype
  # The tokenizer's 224x224 and 112x112 stages over T steps hold most of the activations: rematerialised
  # (layers.REMAT_POLICY), the reference's 24 images per chip fit a 16 GiB TPU v5e (BENCHMARKS.md, pod plan).
  c.model.remat = True
  c.model.overrides.num_heads = 8

  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'  # the imagenet2012 source maps 'test' to tfds' labelled 'validation'
  c.data.augment.randaug = 'rand-m9-mstd0.5-inc1'
  c.data.augment.reprob = 0.25
  c.data.augment.hflip = 0.5
  c.data.augment.image_size = 224
  c.data.augment.crop_pct = 1.0
  c.data.num_workers = 8

  c.batch_size = BATCH[args.variant]
  c.eval_batch_size = 256
  c.num_epochs = 300
  c.optim.lr = 5e-4
  c.optim.min_lr = 1e-5
  c.optim.warmup_lr = 1e-6
  c.optim.warmup_epochs = 20
  c.optim.cooldown_epochs = 10
  c.optim.weight_decay = 0.05
  c.optim.per_epoch_schedule = True

  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.off_epoch = -1
  c.label_smoothing = 0.1

  c.log_every_steps = 100
  c.checkpoint.every_steps = 2000
  c.metric = 'top1'

  if args.runlocal or args.cpu:
    common.shrink_for_cpu(c, steps=20, batch=8, train_examples=48, eval_examples=48)
    c.data.augment.image_size = 64
    c.data.num_workers = 0
    sample_file = common.shared_sample('imagenet_sample', 'sample224.npz')
    if args.cpu:
      common.cpu_budget(c, minutes=10.0, batch=8)
      c.data.max_train_examples = c.data.max_eval_examples = -1
      sample = common.split_sample_dir(sample_file, num_train=25)
    else:
      sample = common.staged_sample_dir(sample_file)
    if sample is not None:
      c.data.name = 'npz'
      c.data.data_dir = str(sample)
      c.data.num_classes = 1000
      c.data.augment.mean = (0.485, 0.456, 0.406)  # the npz source starts from the CIFAR preset
      c.data.augment.std = (0.229, 0.224, 0.225)
  return c
