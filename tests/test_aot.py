"""The TPU compile check: the trainer's real step compiled by XLA's TPU compiler for slices that are not here."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from spikingformer_jax import aot, data, sharding, train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))
import digits  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu is not installed (pip install -r requirements-tpu.txt): '
                                         'no TPU compiler to compile for a TPU slice.')


def small_config(**mesh):
  """The digits config with a 128-wide block: TPU tiling (128 lanes) does not dominate its sizes."""
  c = digits.get_config()
  c.model.overrides = {'embed_dim': 128, 'num_heads': 2}
  c.batch_size = 64
  c.mesh.update(mesh)
  return c


@pytest.mark.parametrize('name, expected', [
    ('v5e:4x4', 'v5e:4x4'), ('v5e-16', 'v5e:4x4'), ('v5e-256', 'v5e:16x16'), ('v4-32', 'v4:2x2x4'),
    ('v5p-64', 'v5p:2x4x4'), ('v5p-8', 'v5p:2x2x1'), ('v6e-8', 'v6e:2x4'), ('v4:2x2x2', 'v4:2x2x2')])
def test_slice_names_map_to_xla_topologies(name, expected):
  assert aot.topology_name(name)[0] == expected


@pytest.mark.parametrize('name', ['v9-8', 'v5e-12', 'v4-6', 'tpu', 'v5e:4y4'])
def test_unknown_topologies_are_one_clear_error(name):
  with pytest.raises(aot.AotError, match='--topology='):
    aot.topology_name(name)


def test_missing_libtpu_is_one_clear_error(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'libtpu' else
                      real_find_spec(name, *a))
  with pytest.raises(aot.AotError, match='pip install -r requirements-tpu.txt'):
    aot.topology_devices('v5e-4')


def test_collectives_are_read_from_hlo():
  hlo = '\n'.join([
      '  %all-gather.1 = f32[32,64]{1,0:T(8,128)} all-gather(%p), channel_id=1, dimensions={0}',
      '  %ar = (f32[64]{0}, bf16[8,128]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add',
      '  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), channel_id=3, dimensions={0}',
      '  %agd = bf16[16,8]{1,0} all-gather-done(%ags)',
      '  %cps = (f32[24,384]{1,0}, f32[24,384]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%w), '
      'channel_id=4, source_target_pairs={{0,1},{1,0}}',
      '  %add.1 = f32[64]{0} add(%all-gather.1, %y)'])
  assert aot.collectives(hlo) == {'all-gather': {'count': 2, 'bytes': 32 * 64 * 4 + 16 * 8 * 2},
                                  'all-reduce': {'count': 1, 'bytes': 64 * 4 + 8 * 128 * 2},
                                  'collective-permute': {'count': 1, 'bytes': 24 * 384 * 4}}


def test_batch_shapes_match_the_loaders():
  config = digits.get_config()
  info = data.dataset_info(config.data)
  loader = data.make_loader(config.data, 'train', batch_size=8, train=True, seed=0)
  real = next(iter(loader))
  shapes = aot.batch_shapes(config, info, 8)
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_nominal_info_needs_no_data():
  import imagenet  # noqa: PLC0415
  import cifar10_dvs  # noqa: PLC0415
  info = aot.nominal_info(imagenet.get_config('variant=8-768'))
  assert (info.num_classes, info.example_shape, info.num_train) == (1000, (224, 224, 3), 1_281_167)
  info = aot.nominal_info(cifar10_dvs.get_config('T=16'))
  assert (info.num_classes, info.example_shape) == (10, (16, 128, 128, 2))
  import glue  # noqa: PLC0415
  assert aot.nominal_info(glue.get_config('task=stsb')) == data.DatasetInfo(  # the one type, text fields set
      num_classes=1, example_shape=(), num_train=aot.NOMINAL_TEXT_TRAIN, num_eval=0, vocab_size=aot.BERT_VOCAB,
      task='regression')


@needs_libtpu
def test_data_parallel_and_fsdp_compile_fit_and_shard_the_state(tmp_path):
  dp = aot.compile_report(small_config(data=-1, fsdp=1), 'v5e:2x2')
  fsdp_hlo = tmp_path / 'fsdp.hlo'
  fsdp = aot.compile_report(small_config(data=1, fsdp=4), 'v5e:2x2', hlo_out=str(fsdp_hlo))
  for report in (dp, fsdp):
    assert report['fits'] and report['hbm']['total_bytes'] < report['hbm_capacity_bytes']
    assert report['per_chip_step']['xla_flops'] > 0 and report['per_chip_step']['bytes_accessed'] > 0
  assert dp['mesh'] == {'data': 4, 'fsdp': 1} and fsdp['mesh'] == {'data': 1, 'fsdp': 4}
  # The state (parameters, Adam moments) dominates the arguments: FSDP keeps a quarter of it per chip.
  info = data.dataset_info(small_config().data)
  ctx, example = train.make_context(small_config(), info)
  state, _ = train.abstract_state(ctx, sharding.make_mesh(small_config().mesh, jax.devices()[:1]), example)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  assert dp['hbm']['argument_bytes'] >= state_bytes
  assert fsdp['hbm']['argument_bytes'] < 0.35 * dp['hbm']['argument_bytes']
  # Pure data parallelism moves no activations: only the gradient and BatchNorm-statistic all-reduces.
  assert set(dp['collectives']) == {'all-reduce'}
  # FSDP gathers the parameters (all-gathers, or rings of collective-permutes) and keeps the batch
  # split: no gather is larger than a parameter, and no activations are exchanged all-to-all (without
  # sharding.keep_batch_split the step all-to-all'ed 3.7 MB, 0.7x the state's bytes).
  assert fsdp['collectives']['all-gather']['count'] > 0
  gathers = [aot.collectives(line)['all-gather']['bytes'] for line in fsdp_hlo.read_text().splitlines()
             if 'all-gather' in line and aot.collectives(line)]
  assert max(gathers) <= max(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state['params']))
  assert fsdp['collectives'].get('all-to-all', {}).get('bytes', 0) < 0.01 * state_bytes


@needs_libtpu
def test_a_step_that_cannot_fit_is_reported_not_raised():
  import imagenet  # noqa: PLC0415
  config = imagenet.get_config('variant=8-384,dtype=float32')
  config.model.overrides.update(depth=1, embed_dim=32, num_heads=2)
  report = aot.compile_report(config, 'v5e:2x2', per_chip_batch=4096)  # 224x224 x T=4 activations
  assert report['fits'] is False
  assert report['hbm']['needed_bytes'] > report['hbm']['available_bytes'] > 15 * aot.GIB
  assert 'DOES NOT FIT' in aot.format_report(report)


@needs_libtpu
def test_batch_not_divisible_by_chips_is_one_clear_error():
  config = small_config()
  config.batch_size = 30
  with pytest.raises(aot.AotError, match='not divisible by the 4 chips'):
    aot.compile_report(config, 'v5e:2x2')


@needs_libtpu
def test_command_line_writes_the_report(tmp_path):
  out = tmp_path / 'report.json'
  cmd = [sys.executable, '-m', 'spikingformer_jax.aot', '--config=experiments/digits.py', '--topology=v5e-4',
         f'--out={out}']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'FITS:' in result.stdout and 'examples/s/chip' in result.stdout
  report = json.loads(out.read_text())
  assert report['xla_topology'] == 'v5e:2x2' and report['fits'] is True
  bad = subprocess.run(cmd[:4] + ['--topology=v5e-12'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith('aot: error: --topology=')


def test_data_parallel_step_moves_no_activations_on_cpu_devices():
  """The same partitioner on the 8 CPU devices here (no libtpu needed): only all-reduces, no gathers."""
  step = aot.lower_train_step(small_config(), jax.devices())
  assert step.mesh.shape == {'data': 8, 'fsdp': 1}
  assert set(aot.collectives(step.lowered.compile().as_text())) == {'all-reduce'}


def test_a_cpu_config_lowers_the_accelerator_step():
  config = small_config()
  config.model.spike_kernels = True  # as the `cpu` configs set them
  config.time_budget_minutes = 10.0  # the step then takes the fraction of the budget spent
  text = aot.lower_train_step(config, jax.devices()[:1]).lowered.as_text()
  assert 'stablehlo.convolution' in text and 'custom_call @spikingformer_' not in text


def test_mixup_keeps_examples_on_their_device():
  """Mixup/cutmix pair examples within each device's shard (as each GPU of the reference mixes its own batch):
  the data-parallel step still has only all-reduces (a whole-batch flip is a collective-permute of the images)."""
  config = small_config()
  config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0)
  step = aot.lower_train_step(config, jax.devices())
  assert set(aot.collectives(step.lowered.compile().as_text())) == {'all-reduce'}


@needs_libtpu
def test_one_event_recording_per_chip_moves_no_activations():
  """DVS at one recording per chip with T = chips: the partitioner split BatchNorm's backward over time and
  all-to-alled every tokenizer activation (20 all-to-alls here; 224 MB per chip per step for DVS128 T=16 on
  v5e-16) until `sharding.pin_batch` pinned the batch axis of the time fold's `[T, B, ...]` output."""
  import nmnist  # noqa: PLC0415
  config = nmnist.get_config('T=8')
  config.model.overrides = dict(config.model.overrides, embed_dim=64, num_heads=2)
  config.batch_size = 8
  report = aot.compile_report(config, 'v5e-8')
  assert report['mesh'] == {'data': 8, 'fsdp': 1}
  # All-reduces of gradients and statistics, and mixup's pairing of neighbouring chips' single recordings.
  assert set(report['collectives']) == {'all-reduce', 'collective-permute'}
