"""Masked-language-model pretraining of Spikingformer-Text on a plain-text corpus.

  --config=experiments/pretrain_mlm.py:variant=12-768,corpus=/data/wikipedia_txt
  --config=experiments/pretrain_mlm.py:variant=tiny,corpus=/tmp/corpus,runlocal

The corpus directory holds *.txt files, one document per line (optionally in train/ and validation/
sub-folders; otherwise every 100th document is held out). BERT's 15% / 80-10-10 masking over packed
128-token sequences, with BERT's pretraining optimiser shape (AdamW, warmup, weight decay 0.01) at the
from-scratch rate of experiments/common.py `text_lr_from_scratch` (2e-3 for tiny, else 5e-4).
Fine-tune with experiments/glue.py and --config.init_from=<this run's checkpoint>.
"""
from __future__ import annotations

import ml_collections

from experiments import common
from spikingformer_jax import configs, registry
from spikingformer_jax.text import data


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = common.parse_args(arg, variant='12-768', corpus='', vocab='')
  variant = args.variant
  model_name = f'spikingformer-text-{variant}'
  if model_name not in registry.MODELS:
    sizes = [m[len('spikingformer-text-'):] for m in registry.names(registry.TEXT)]
    raise ValueError(f'variant={variant!r}: expected one of {sizes}.')
  runlocal = args.runlocal

  c = configs.base_config()
  c.task = 'mlm'
  c.data.update(data.text_data_defaults())
  c.data.name = data.MLM_DATASET
  c.data.data_dir = args.corpus  # required: the trainer's validate() / dataset_info() say so if empty
  c.data.vocab_file = args.vocab
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.max_len = 128
  c.data.dynamic_padding = False  # packed sequences are full length anyway
  c.data.augment.enabled = False
  c.data.max_eval_examples = 2048

  c.model.name = model_name
  c.model.num_classes = 30522  # the vocabulary; the trainer takes vocab_size from data.dataset_info()
  c.model.T = 4
  c.model.overrides = ml_collections.ConfigDict(dict(max_len=512, tie_embeddings=True))  # task comes from c.task

  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 40
  c.optim.lr = common.text_lr_from_scratch('tiny' if runlocal else variant)
  c.optim.min_lr = 1e-5
  c.optim.warmup_lr = 0.0
  c.optim.warmup_epochs = 1
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.per_epoch_schedule = False
  c.label_smoothing = 0.0
  c.metric = 'mlm_accuracy'
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep_best = True

  if runlocal:
    c.model.name = 'spikingformer-text-tiny'
    c.model.T = 2
    c.model.overrides.max_len = 64
    c.data.max_len = 64
    c.data.max_eval_examples = 64
    c.batch_size = 16
    c.eval_batch_size = 32
    c.total_steps = 50
    c.log_every_steps = 10
    c.checkpoint.every_steps = 25
    c.progress_bar = False
  return c
