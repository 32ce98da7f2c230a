"""The benchmark configs: reference hyperparameters, validation, full-size models, one real step each."""
import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import shared_path
from experiments import cifar10, cifar10_dvs, cifar100, common, digits, dvs128_gesture, glue, imagenet, nmnist
from spikingformer_jax import configs, data, optim, registry, train

MODULES = {'imagenet': imagenet, 'cifar10': cifar10, 'cifar100': cifar100, 'cifar10_dvs': cifar10_dvs,
           'dvs128_gesture': dvs128_gesture, 'nmnist': nmnist}

# The reference repository's recipes (imagenet/imagenet.yml, cifar10/cifar10.yml, cifar100/cifar100.yml, and the
# defaults of cifar10-dvs/train.py and dvs128-gesture/train.py), written out here independently of the configs:
# (lr, min_lr, warmup_lr, warmup_epochs, epochs, cooldown, weight_decay, batch, mixup, cutmix, prob, switch,
#  off_epoch, smoothing, randaug, heads, T, seed)
REFERENCE = {
    'imagenet': (5e-4, 1e-5, 1e-6, 20, 300, 10, 0.05, 192, 0.8, 1.0, 1.0, 0.5, -1, 0.1, 'rand-m9-mstd0.5-inc1', 8,
                 4, 42),
    'cifar10': (5e-4, 1e-5, 1e-5, 20, 400, 10, 0.06, 64, 0.5, 0.0, 1.0, 0.5, 200, 0.1, 'rand-m9-n1-mstd0.4-inc1', 12,
                4, 42),
    'cifar100': (5e-4, 1e-5, 1e-5, 20, 400, 10, 0.06, 64, 0.5, 0.0, 1.0, 0.5, 200, 0.1, 'rand-m9-n1-mstd0.4-inc1', 8,
                 4, 42),
    'cifar10_dvs': (1e-3, 1e-5, 1e-5, 10, 96, 10, 0.06, 16, 0.5, 0.0, 0.5, 0.5, 75, 0.1, None, 16, 16, 2021),
    'dvs128_gesture': (1e-3, 1e-5, 1e-5, 10, 192, 10, 0.06, 16, 0.5, 0.0, 0.5, 0.5, 75, 0.1, None, 16, 16, 2021),
}


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_configs_carry_the_reference_hyperparameters(name):
  c = MODULES[name].get_config('')
  got = (c.optim.lr, c.optim.min_lr, c.optim.warmup_lr, c.optim.warmup_epochs, c.num_epochs,
         c.optim.cooldown_epochs, c.optim.weight_decay, c.batch_size, c.mixup.mixup_alpha, c.mixup.cutmix_alpha,
         c.mixup.prob, c.mixup.switch_prob, c.mixup.off_epoch, c.label_smoothing, c.data.augment.get('randaug'),
         c.model.overrides.num_heads, c.model.T, c.seed)
  assert got == REFERENCE[name]
  assert c.optim.per_epoch_schedule and c.optim.name == 'adamw' and c.optim.grad_clip == 0.0
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
  if name in ('imagenet', 'cifar10', 'cifar100'):
    assert (c.data.augment.reprob, c.data.augment.hflip) == (0.25, 0.5)
  else:
    assert c.data.augment.snn_augment and c.data.augment.hflip == 0.5
    assert c.data.T == c.model.T and c.data.split_by == 'number'


def test_imagenet_batch_follows_the_logs_and_the_resolutions():
  assert imagenet.get_config('variant=8-768').batch_size == 192  # 24/GPU x 8 (6,672 it/epoch)
  assert imagenet.get_config('variant=8-512').batch_size == 288  # 36/GPU x 8 (4,448 it/epoch)
  c = imagenet.get_config('')
  assert (c.data.augment.image_size, c.data.augment.crop_pct, c.data.name) == (224, 1.0, 'imagenet2012')
  assert cifar10.get_config('variant=4-256').model.overrides.num_heads == 8  # 256 is not divisible by 12
  assert cifar10_dvs.get_config('T=10').data.T == 10 and dvs128_gesture.get_config('').model.num_classes == 11


@pytest.mark.parametrize('name', sorted(MODULES))
@pytest.mark.parametrize('family', common.FAMILIES)
def test_every_config_and_family_validates(name, family):
  for arg in (f'family={family}', f'family={family},runlocal'):
    c = MODULES[name].get_config(arg)
    configs.validate(c)
    assert c.model.name.startswith(family + '-') and c.model.name in registry.MODELS
  if family == 'spikformer' and name == 'cifar10':
    assert MODULES[name].get_config('family=spikformer').model.name == 'spikformer-cifar-4-384'


def test_bad_arguments_and_values_are_rejected_with_the_field_named():
  with pytest.raises(ValueError, match="Unknown config argument 'varient'"):
    cifar10.get_config('varient=4-384')
  with pytest.raises(ValueError, match=r"sizes for 'spikingformer': \['2-384', '4-256', '4-384'\]"):
    cifar10.get_config('variant=8-768')
  with pytest.raises(ValueError, match='family='):
    imagenet.get_config('family=resnet')
  with pytest.raises(ValueError, match=r"T='x': expected int"):
    cifar10_dvs.get_config('T=x')
  with pytest.raises(ValueError, match='expected a boolean'):
    cifar10.get_config('runlocal=maybe')
  c = cifar10.get_config('')
  c.optim.lrr = 1e-3
  with pytest.raises(configs.ConfigError, match="Unknown config key optim.'lrr'"):
    configs.validate(c)
  c = cifar10.get_config('')
  c.optim.min_lr = 1.0
  with pytest.raises(configs.ConfigError, match=r'config.optim.min_lr = 1.0: expected in \[0, optim.lr\]'):
    configs.validate(c)


def test_config_mistakes_name_what_is_accepted():
  with pytest.raises(ValueError, match=r"Unknown config argument 'bogus' in 'bogus'; known: \['runlocal'\]"):
    digits.get_config('bogus')
  assert digits.get_config('runlocal').num_epochs == 2
  c = digits.get_config('')
  c.model.name = 'spikingformer-tiniest'
  with pytest.raises(configs.ConfigError, match=r"model.name = 'spikingformer-tiniest': expected a registered model: "
                                                r".*spikingformer-cifar-4-384.*spikingformer-text-tiny"):
    configs.validate(c)
  c.model.name = 'spikingformer-text-tiny'
  with pytest.raises(configs.ConfigError, match=r"'spikingformer-text-tiny' is a text model, but config.data.name = "
                                                r"'digits' is not a text dataset"):
    configs.validate(c)
  text = glue.get_config('task=rte,variant=tiny')
  text.model.name = 'spikingformer-tiny'
  with pytest.raises(configs.ConfigError, match=r"is a vision model, but config.data.name = 'glue/rte' is not an "
                                                r"image or event dataset"):
    configs.validate(text)


# The reference models' parameter counts without their unused LayerNorms (our blocks create none).
@pytest.mark.parametrize('name,arg,params', [
    ('imagenet', 'variant=8-768', 66_338_632), ('cifar10', 'variant=4-384', 9_320_122),
    ('cifar100', 'variant=4-384', 9_354_772), ('cifar10_dvs', 'T=16', 2_566_666),
    ('dvs128_gesture', 'T=16', 2_566_923)])
def test_full_size_models_build_with_the_reference_parameter_counts(name, arg, params):
  c = MODULES[name].get_config(arg)
  overrides = dict(c.model.overrides)
  assert registry.param_count(c.model.name, num_classes=c.model.num_classes, T=c.model.T, **overrides) == params


def _one_step(config, tmp_path):
  config.total_steps = 1
  config.data.max_eval_examples = 16
  config.eval_batch_size = 16
  summary = train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  return summary, records


def test_runlocal_cifar10_reads_the_real_sample_with_the_recipes_augmentation():
  """(The image training step itself runs in test_suite's CIFAR-100 smoke run; this checks the data path.)"""
  shared_path('data', 'cifar10', 'train.npz')
  c = cifar10.get_config('runlocal')
  assert c.data.name == 'cifar10_sample' and c.model.overrides.depth == 1
  info = data.dataset_info(c.data)
  assert (info.num_classes, info.example_shape, info.num_train, info.num_eval) == (10, (32, 32, 3), 256, 64)
  batch = next(iter(data.make_loader(c.data, 'train', batch_size=c.batch_size, train=True, seed=c.seed)))
  assert batch['image'].shape == (8, 32, 32, 3) and set(batch['label']) <= set(range(10))
  # CIFAR normalisation: pixels in [0, 1] map into [-mean/std, (1-mean)/std] per channel (erased pixels too).
  mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
  per_channel = batch['image'].reshape(-1, 3)
  assert np.all(per_channel.min(0) >= -mean / std - 1e-4) and np.all(per_channel.max(0) <= (1 - mean) / std + 1e-4)


def test_runlocal_dvs_takes_a_real_step_on_the_event_standin(tmp_path):
  shared_path('data', 'nmnist', 'train.npz')
  c = cifar10_dvs.get_config('runlocal')
  assert (c.data.name, c.data.T, c.model.T, c.model.name) == ('nmnist_sample', 4, 4, 'spikingformer-dvs-2-256')
  summary, records = _one_step(c, tmp_path)
  assert summary['completed'] and 0.0 <= summary['final']['top1'] <= 1.0
  assert any(r['split'] == 'eval' for r in records)


def test_runlocal_imagenet_reads_the_shared_sample_through_the_npz_source():
  sample = shared_path('data', 'imagenet_sample', 'sample224.npz')
  c = imagenet.get_config('runlocal')
  assert c.data.name == 'npz'
  info = data.dataset_info(c.data)
  assert (info.num_classes, info.example_shape, info.num_train) == (1000, (64, 64, 3), 48)
  assert (pathlib.Path(c.data.data_dir) / 'train.npz').resolve() == sample.resolve()


def test_cpu_configs_cut_the_recipes_to_a_wall_time_budget():
  c = cifar10.get_config('cpu')
  # CIFAR-10 in 10 minutes: 2-256, T=4, batch 32, AdamW with the recipe's cosine 5e-4 -> 1e-5 over the budget,
  # weight decay 0.06, label smoothing 0.1, horizontal flips only, no mixup, on the real sample.
  assert (c.model.name, c.model.overrides.depth, c.model.T, c.batch_size) == ('spikingformer-cifar-4-256', 2, 4, 32)
  assert (c.optim.lr, c.optim.weight_decay, c.label_smoothing, c.time_budget_minutes) == (5e-4, 0.06, 0.1, 10.0)
  total = 312 * c.num_epochs  # the clock ends the run: the trainer reads the schedule at this fraction of total
  schedule = optim.make_schedule(c.optim, c.num_epochs, 312)
  assert [float(schedule(p * total)) for p in (0, 0.5, 1)] == pytest.approx([5e-4, 2.55e-4, 1e-5])  # no warmup
  assert (c.data.augment.randaug, c.data.augment.reprob, c.data.augment.hflip) == ('', 0.0, 0.5)
  assert c.mixup.mixup_alpha == c.mixup.cutmix_alpha == 0.0 and c.model.spike_kernels
  assert c.data.name == 'cifar10_sample' and c.eval_every_epochs >= c.num_epochs  # one evaluation, at the end
  assert cifar10.get_config('variant=2-256').model.overrides.depth == 2
  assert registry.param_count(c.model.name, num_classes=10, T=4, **dict(c.model.overrides)) < 4_152_106  # < 4-256
  events = nmnist.get_config('cpu')
  configs.validate(events)
  assert (events.data.name, events.data.T, events.model.T, events.optim.lr, events.data.augment.snn_augment) == (
      'nmnist_sample', 4, 4, 1e-3, False)
  shared_path('data', 'imagenet_sample', 'sample224.npz')
  c = imagenet.get_config('cpu')
  train_labels = data.pipeline.open_source(c.data, 'train').labels
  test_labels = data.pipeline.open_source(c.data, 'test').labels
  assert len(train_labels) == len(test_labels) == 25 and not set(train_labels) & set(test_labels)
