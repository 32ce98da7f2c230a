"""Spikingformer-Text on a GLUE task or a single-sentence set, trained from scratch or fine-tuned.

  --config=experiments/glue.py:task=sst2_sentence,variant=tiny        from scratch, a few CPU minutes
  --config=experiments/glue.py:task=rte,variant=12-768
  --config=experiments/glue.py:task=rte,variant=12-768,init_from=/path/to/mlm/checkpoint   fine-tune
  --config=experiments/glue.py:task=sst2,runlocal                     a smoke run of a minute

`task`: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte (GLUE, official TSV layout or prepared TFDS);
sst2_sentence (the sentence-level SST-2 of Socher et al. 2013: 6,920 training sentences, the same 872 dev
sentences as GLUE's SST-2, whose training set is 67k phrases), sst5, mr, subj, chnsenticorp, waimai
(label<TAB>text; the Chinese ones use a character vocabulary).
`variant`: a `spikingformer-text-<variant>` size (12-768, 8-768, 8-512, 6-512, 8-384, 4-256, tiny).

Two recipes, both AdamW with weight decay 0.01, gradient clipping at 1, batch 32, no label smoothing:
- from scratch (no `init_from`): the rate a network trained from random weights needs
  (`common.text_lr_from_scratch`: 2e-3 for the tiny model, measured on SST-2, where 1e-4 leaves it near the
  majority rate; 5e-4, the vision recipe's, for widths of 256 and more), warmup over the first epoch, then a
  cosine to 0; word dropout 0.2 (text/data.py: the model has no dropout of its own and memorises
  a few thousand sentences within an epoch); sentence pairs get the cross-segment match embedding
  (text/README.md).
- fine-tuning (`init_from=<checkpoint>`, e.g. an experiments/pretrain_mlm.py run): BERT's recipe, lr 1e-4,
  warmup over the first epoch, then a cosine to 0. The checkpoint's backbone is restored, the task head
  is new (train.merge_pretrained).
Set `init_from` in the config argument, not only with --config.init_from: the argument picks the recipe.
"""
from __future__ import annotations

import ml_collections

from experiments import common
from spikingformer_jax import configs, metrics, registry
from spikingformer_jax.text import data, glue

GLUE = tuple(glue.GLUE_TASKS)
# Single-sentence tasks: task name -> text.data dataset name.
SENTENCE = {'sst2_sentence': 'sst2', 'sst5': 'sst5', 'mr': 'mr', 'subj': 'subj', 'chnsenticorp': 'chnsenticorp',
            'waimai': 'waimai'}
TASKS = GLUE + tuple(SENTENCE)
SMALL_TASKS = ('rte', 'mrpc', 'stsb', 'cola')  # < 10k training examples: more epochs
FINE_TUNE_LR = 1e-4
# From scratch (no pretrained backbone). Measured on sentence-level SST-2, tiny, 3 epochs, 872 dev sentences
# (one standard error 0.014): warmup over the first epoch with word dropout 0.2 -> 0.790 (0.1 -> 0.789); a 10%
# warmup -> 0.786 with word dropout 0.2, 0.780 without; weight decay 0.1, 5 epochs, T=2 or lr 1e-3 did no better.
WORD_DROPOUT = 0.2


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = common.parse_args(arg, task='sst2', variant='12-768', init_from='')
  if args.task not in TASKS:
    raise ValueError(f'task={args.task!r}: expected one of {TASKS}.')
  variant = 'tiny' if args.runlocal else args.variant
  model_name = f'spikingformer-text-{variant}'
  if model_name not in registry.MODELS:
    sizes = [m[len('spikingformer-text-'):] for m in registry.names(registry.TEXT)]
    raise ValueError(f'variant={variant!r}: expected one of {sizes}.')

  c = configs.base_config()
  c.data.update(data.text_data_defaults())
  if args.task in GLUE:
    spec = glue.GLUE_TASKS[args.task]
    c.data.name = f'glue/{args.task}'
    c.data.eval_split = 'validation_matched' if args.task == 'mnli' else 'validation'
    num_classes, c.task = spec.num_classes, spec.task
  else:
    c.data.name = SENTENCE[args.task]
    c.data.eval_split = 'validation'
    num_classes, c.task = data.SENTENCE_DATASETS[c.data.name][0], 'classification'
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
  c.num_epochs = 10 if args.task in SMALL_TASKS else 3
  c.optim.min_lr = 0.0
  c.optim.warmup_lr = 0.0
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.per_epoch_schedule = False
  c.init_from = args.init_from
  c.optim.warmup_epochs = 1
  if args.init_from:
    c.optim.lr = FINE_TUNE_LR
  else:
    c.optim.lr = common.text_lr_from_scratch(variant)
    c.data.word_dropout = WORD_DROPOUT
    # Sentence pairs: the premise/hypothesis word overlap that pretraining would otherwise teach (text/README.md).
    c.model.overrides.cross_segment_match = args.task in GLUE and glue.GLUE_TASKS[args.task].text_b is not None
  c.label_smoothing = 0.0
  c.checkpoint.every_steps = 500

  if args.runlocal:
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
