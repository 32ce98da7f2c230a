"""Spikingformer-Text fine-tuning on a GLUE task (or SST-5/MR/Subj/ChnSentiCorp/Waimai).

  --config=experiments/glue.py:task=rte,variant=12-768
  --config=experiments/glue.py:task=sst2,variant=tiny,runlocal
  fine-tune from MLM pretraining: --config.init_from=/path/to/mlm/checkpoint (the task head is new)

`task`: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte (GLUE, official TSV layout or prepared TFDS)
or sst5, mr, subj, chnsenticorp, waimai (label<TAB>text; the Chinese ones use a character vocabulary).
`variant`: a `spikingformer-text-<variant>` size (12-768, 8-768, 8-512, 6-512, 8-384, 4-256, tiny).
Recipe: BERT's fine-tuning recipe (AdamW, linear warmup over the first epoch, batch 32, no label
smoothing) with a learning rate for a spiking network.
"""
from __future__ import annotations

import ml_collections

from spikingformer_jax import configs, metrics
from spikingformer_jax.text import data, glue
from spikingformer_jax.text import model as text_model

GLUE = tuple(glue.GLUE_TASKS)
# Single-sentence sets. 'sst2' is GLUE SST-2 (67k phrases); the sentence-level SST-2 is data.name='sst2'.
SENTENCE = ('sst5', 'mr', 'subj', 'chnsenticorp', 'waimai')
SMALL_TASKS = ('rte', 'mrpc', 'stsb', 'cola')  # < 10k training examples: more epochs


def parse_arg(arg: str) -> dict:
  out = {}
  for part in filter(None, (arg or '').split(',')):
    key, _, value = part.partition('=')
    out[key.strip()] = value.strip() if value else True
  unknown = set(out) - {'task', 'variant', 'runlocal'}
  if unknown:
    raise ValueError(f'Unknown config argument(s) {sorted(unknown)}; expected task=..., variant=..., runlocal.')
  return out


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  task = args.get('task', 'sst2')
  variant = args.get('variant', '12-768')
  runlocal = bool(args.get('runlocal', False))
  if task not in GLUE + SENTENCE:
    raise ValueError(f'task={task!r}: expected one of {GLUE + SENTENCE}.')
  model_name = f'spikingformer-text-{variant}'
  if model_name not in text_model.TEXT_MODELS:
    sizes = [m[len('spikingformer-text-'):] for m in text_model.TEXT_MODELS]
    raise ValueError(f'variant={variant!r}: expected one of {sizes}.')

  c = configs.base_config()
  c.data.update(data.text_data_defaults())
  if task in GLUE:
    spec = glue.GLUE_TASKS[task]
    c.data.name = f'glue/{task}'
    c.data.eval_split = 'validation_matched' if task == 'mnli' else 'validation'
    num_classes, c.task = spec.num_classes, spec.task
  else:
    c.data.name = task
    c.data.eval_split = 'validation'
    num_classes, c.task = data.SENTENCE_DATASETS[task][0], 'classification'
  c.data.train_split = 'train'
  c.data.task_name = c.data.name  # the trainer reports metrics.task_metrics(task_name, ...)
  c.metric = metrics.task_metric_names(c.data.task_name)[0]  # the official primary metric
  c.data.max_len = 128
  c.data.augment.enabled = False

  c.model.name = model_name
  c.model.num_classes = num_classes
  c.model.T = 4
  c.model.overrides = ml_collections.ConfigDict(dict(max_len=512, tie_embeddings=True, cross_segment_match=False))

  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_epochs = 10 if task in SMALL_TASKS else 3
  c.optim.lr = 1e-4
  c.optim.min_lr = 0.0
  c.optim.warmup_lr = 0.0
  c.optim.warmup_epochs = 1  # BERT warms up over 10% of training; base_config keeps whole epochs
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.per_epoch_schedule = False
  c.label_smoothing = 0.0
  c.checkpoint.every_steps = 500

  if runlocal:
    c.model.name = 'spikingformer-text-tiny'
    c.model.T = 2
    c.model.overrides.max_len = 64
    c.data.max_len = 64
    c.data.max_train_examples = 512
    c.data.max_eval_examples = 256
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 50
    c.log_every_steps = 10
    c.checkpoint.every_steps = 25
    c.progress_bar = False
  return c
