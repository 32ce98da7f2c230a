"""The training-config schema: defaults shared by every experiment, and validation.

Experiments (`experiments/<benchmark>.py`) start from `base_config()` and change values; the
trainer calls `validate(config)` first, so a misspelt key or an impossible value fails before any
compilation, with the offending field named.
"""
from __future__ import annotations

import ml_collections

TASKS = ('classification', 'regression', 'mlm')
DTYPES = ('float32', 'bfloat16')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.task = 'classification'  # 'classification' | 'regression' (STS-B) | 'mlm'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'spikingformer-tiny'
  c.model.num_classes = 10
  c.model.T = 4
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32
  c.model.remat = False
  c.model.spike_kernels = False  # the sparse spike kernels of spikingformer_jax.kernels (one CPU device)
  c.model.overrides = ml_collections.ConfigDict()  # any other model field, e.g. {'num_heads': 8}

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'  # a dataset from spikingformer_jax.data's registry
  c.data.data_dir = ''  # tfds data_dir / raw or prepared files; '' = the source's default
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.num_workers = 0  # grain worker processes
  c.data.prefetch = 2
  c.data.augment = ml_collections.ConfigDict()  # source-specific, see data/augment.py
  c.data.augment.enabled = True
  c.data.max_train_examples = -1  # >0 truncates (quick runs); -1 = all
  c.data.max_eval_examples = -1
  c.data.num_classes = 0  # generic 'npz' / 'tsv' sources: 0 = infer from the labels
  c.data.T = 16  # event datasets: frames per example
  c.data.split_by = 'number'  # event datasets: SpikingJelly's 'number' or 'time' integration
  c.data.task_name = ''  # e.g. 'glue/cola': adds that task's official metrics to evaluation

  c.batch_size = 64  # global, over all hosts and devices
  c.eval_batch_size = 256
  c.num_epochs = 10
  c.total_steps = -1  # >0 overrides num_epochs and sets the LR schedule's length (quick runs)
  c.time_budget_minutes = 0.0  # >0: training stops after this much wall time (compiling included), then evaluates
  c.grad_accum_steps = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'
  c.optim.lr = 5e-4
  c.optim.min_lr = 1e-5
  c.optim.warmup_lr = 1e-6
  c.optim.warmup_epochs = 0.0  # fractional epochs allowed (e.g. 10% of a 3-epoch run)
  c.optim.cooldown_epochs = 0
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 0.0  # global-norm clip; 0 disables
  c.optim.per_epoch_schedule = True  # timm steps the schedule once per epoch

  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.off_epoch = -1  # epoch from which mixup/cutmix stop; -1 = never
  c.label_smoothing = 0.1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by other axes
  c.mesh.fsdp = 1
  c.distributed = False  # call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_best = True
  c.checkpoint.async_save = True
  # gs:// workdirs: a run lock whose heartbeat (refreshed at every checkpoint) is older than this is
  # stale and taken over. Local workdirs need no timeout (the lock dies with its process).
  c.run_lock_stale_after_s = 7200.0

  c.init_from = ''  # checkpoint to fine-tune from (backbone restored, head re-initialised)
  c.freeze = ''  # regex over parameter paths kept frozen when fine-tuning, e.g. '^tokenizer/'

  c.eval_every_epochs = 1
  c.log_every_steps = 50
  c.metric = 'top1'  # the metric that selects the best checkpoint
  c.progress_bar = True
  return c


class ConfigError(ValueError):
  pass


def _check_keys(config, reference, prefix=''):
  for key in config.keys():
    if key not in reference:
      raise ConfigError(f'Unknown config key {prefix}{key!r}; known keys at this level: {sorted(reference.keys())}.')
    ref_value = reference[key]
    if isinstance(ref_value, ml_collections.ConfigDict) and key not in ('overrides', 'augment'):
      _check_keys(config[key], ref_value, f'{prefix}{key}.')


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None):
  """Rejects unknown keys and impossible values with a message naming the field."""
  from spikingformer_jax import registry  # noqa: PLC0415 (it imports the text model, which imports TASKS)
  from spikingformer_jax.text import data as text_data  # noqa: PLC0415 (keeps tokenizers optional)
  text_dataset = text_data.is_text_dataset(config.data.name)
  if reference is None:
    reference = base_config()
    if text_dataset:
      reference.data.update(text_data.text_data_defaults())
  _check_keys(config, reference)

  def need(cond, field, expected):
    if not cond:
      value = config
      for part in field.split('.'):
        value = value[part]
      raise ConfigError(f'config.{field} = {value!r}: expected {expected}.')

  need(config.task in TASKS, 'task', f'one of {TASKS}')
  need(config.model.name in registry.MODELS, 'model.name', f'a registered model: {", ".join(registry.names())}')
  text_model_named = registry.get_spec(config.model.name).kind == registry.TEXT
  if text_model_named != text_dataset:
    kinds = ('a text', 'a text') if text_model_named else ('a vision', 'an image or event')
    raise ConfigError(f'config.model.name = {config.model.name!r} is {kinds[0]} model, but config.data.name = '
                      f'{config.data.name!r} is not {kinds[1]} dataset: spikingformer-text-* models take text '
                      '(glue/<task>, the sentence sets, mlm_text), the others images or event frames.')
  need(config.model.dtype in DTYPES, 'model.dtype', f'one of {DTYPES}')
  need(config.model.T >= 1, 'model.T', 'a positive number of time steps')
  need(config.model.num_classes >= 1, 'model.num_classes', 'at least 1')
  need(config.batch_size >= 1, 'batch_size', 'a positive global batch size')
  need(config.time_budget_minutes >= 0, 'time_budget_minutes', '>= 0 (0 = no time limit)')
  need(config.grad_accum_steps >= 1, 'grad_accum_steps', '>= 1')
  need(config.batch_size % config.grad_accum_steps == 0, 'batch_size', 'divisible by grad_accum_steps')
  need(config.num_epochs >= 1 or config.total_steps > 0, 'num_epochs', '>= 1 (or total_steps > 0)')
  need(config.optim.lr > 0, 'optim.lr', 'a positive learning rate')
  need(0 <= config.optim.min_lr <= config.optim.lr, 'optim.min_lr', 'in [0, optim.lr]')
  need(config.optim.warmup_epochs >= 0, 'optim.warmup_epochs', '>= 0')
  need(config.optim.weight_decay >= 0, 'optim.weight_decay', '>= 0')
  need(0 <= config.label_smoothing < 1, 'label_smoothing', 'in [0, 1)')
  need(0 <= config.mixup.prob <= 1, 'mixup.prob', 'in [0, 1]')
  need(config.mixup.mixup_alpha >= 0 and config.mixup.cutmix_alpha >= 0, 'mixup.mixup_alpha',
       'non-negative mixup/cutmix alphas')
  need(config.mesh.fsdp >= 1, 'mesh.fsdp', '>= 1')
  need(config.mesh.data == -1 or config.mesh.data >= 1, 'mesh.data', '-1 or >= 1')
  need(config.checkpoint.every_steps >= 1, 'checkpoint.every_steps', '>= 1')
  need(config.checkpoint.keep >= 1, 'checkpoint.keep', '>= 1')
  need(config.run_lock_stale_after_s > 0, 'run_lock_stale_after_s', 'a positive number of seconds')
  return config
