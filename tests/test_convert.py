"""The PyTorch converter: exact round trips, whole-model parity with the reference, and bad files refused."""
import argparse
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import shared_path
from spikingformer_jax import models, registry
from spikingformer_jax.porting import convert, torch_mapping, weights

torch = pytest.importorskip('torch')

# (dump, variant, overrides on the command line)
PARITY_CASES = {
    'cifar': ('ref_cifar_2-128.npz', 'spikingformer-cifar-4-384', dict(depth=2, embed_dim=128, num_heads=8)),
    'imagenet': ('ref_imagenet_1-64.npz', 'spikingformer-8-384', dict(depth=1, embed_dim=64, num_heads=8)),
}


def load_dump(name):
  return np.load(shared_path('reference', 'parity', name))


def reference_state_dict(dump) -> dict:
  """The dump's weights as the reference's state_dict (torch tensors, BN counters as int64 like PyTorch)."""
  state = {}
  for key in dump.files:
    if key.startswith('w/'):
      value = torch.from_numpy(np.array(dump[key]))
      state[key[2:]] = value.long() if key.endswith('num_batches_tracked') else value
  return state


def cli_args(torch_path, variant, out, **overrides):
  return ['--torch', str(torch_path), '--variant', variant, '--out', str(out)] + [
      f'--{k}={v}' for k, v in overrides.items()]


def random_torch_state(variant, **overrides):
  """A reference-named state_dict with random values, via the mapping's reverse direction."""
  model = registry.get_model(variant, **overrides)
  abstract = models.abstract_variables(model, (1,) + tuple(registry.get_spec(variant).input_shape))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  state = torch_mapping.flax_to_torch(variables, model, with_unused_norms=True)
  return variables, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def assert_nothing_written(directory: pathlib.Path, *expected):
  assert sorted(p.name for p in directory.iterdir()) == sorted(expected)


# ---------------------------------------------------------------------------------------------------
# Whole-model parity through the converter.


@pytest.mark.parametrize('case', sorted(PARITY_CASES))
def test_converted_reference_weights_reproduce_every_spike_and_the_logits(tmp_path, case):
  dump_name, variant, overrides = PARITY_CASES[case]
  dump = load_dump(dump_name)
  torch.save({'state_dict': reference_state_dict(dump), 'epoch': 7}, tmp_path / 'ref.pth')
  assert convert.main(cli_args(tmp_path / 'ref.pth', variant, tmp_path / 'w', **overrides)) == 0

  variables, meta = weights.load_weights(tmp_path / 'w')
  model = weights.build_model_from_meta(meta)
  x = np.transpose(dump['x'], (0, 2, 3, 1))  # NCHW -> NHWC
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['spikes']))(variables, x)

  sown = {path[:-1]: value[0] for path, value in traverse_util.flatten_dict(state['spikes']).items()}
  names = torch_mapping.reference_lif_names(model)
  reference_lifs = {k[len('spk/'):] for k in dump.files if k.startswith('spk/')}
  assert set(sown) == set(names) and set(names.values()) == reference_lifs
  for path, ref_name in names.items():
    shape = tuple(dump[f'shape/{ref_name}'])
    expected = np.unpackbits(dump[f'spk/{ref_name}'])[:np.prod(shape)].reshape(shape)
    ours = torch_mapping.spikes_to_reference_layout(sown[path], shape)
    assert 0.05 < expected.mean() < 0.6, ref_name  # The LIF is really firing, and not saturated.
    np.testing.assert_array_equal(ours, expected, err_msg=f'spikes of {ref_name} ({"/".join(path)})')
  np.testing.assert_allclose(logits, dump['logits'], rtol=1e-5, atol=1e-5 * np.abs(dump['logits']).max())


# ---------------------------------------------------------------------------------------------------
# Round trips.


def test_reference_state_dict_round_trip_is_exact(tmp_path):
  dump_name, variant, overrides = PARITY_CASES['cifar']
  original = reference_state_dict(load_dump(dump_name))
  # A DDP-wrapped model saved bare: keys carry the 'module.' prefix and there is no timm dict.
  torch.save({f'module.{k}': v for k, v in original.items()}, tmp_path / 'ddp.pth')
  convert.main(cli_args(tmp_path / 'ddp.pth', variant, tmp_path / 'w', **overrides))
  convert.main(['--reverse', '--weights', str(tmp_path / 'w'), '--out', str(tmp_path / 'back.pth')])

  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert back['arch'] == variant
  back = back['state_dict']
  assert back.keys() == original.keys()
  for key, value in original.items():
    if key.endswith('num_batches_tracked'):  # Not kept; written as a fresh counter.
      assert back[key].dtype == torch.int64 and back[key].item() == 0
    else:
      assert back[key].dtype == torch.float32 and back[key].shape == value.shape, key
      assert torch.equal(back[key], value), key


def test_spikformer_checkpoint_round_trip(tmp_path):
  variables, state = random_torch_state('spikformer-8-384', depth=1, embed_dim=32, num_heads=4, num_classes=5)
  assert 'patch_embed.rpe_conv.weight' in state and 'block.0.mlp.fc1_conv.weight' in state
  torch.save({'state_dict': state}, tmp_path / 'spikformer.pth')
  convert.torch_to_weights(tmp_path / 'spikformer.pth', 'spikformer-8-384', tmp_path / 'w', depth=1, embed_dim=32,
                           num_heads=4)
  loaded, meta = weights.load_weights(tmp_path / 'w')
  assert meta['model_overrides'] == {'depth': 1, 'embed_dim': 32, 'num_heads': 4, 'num_classes': 5}
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  back = convert.weights_to_torch(tmp_path / 'w', tmp_path / 'back.pth')
  assert back.keys() == state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def spikformer_reference_state(code, depth=1, dim=32, hidden=128, classes=5, tokens=4):
  """A state_dict named and shaped like ZK-Zhou/spikformer's cifar10 ('cifar') or cifar10dvs ('dvs') model.

  Written from the reference code's layer list, independently of torch_mapping. Values are random except
  where a real checkpoint is fixed too: the unused LayerNorms stay at their init (1, 0), the unused DVS
  pos_embed is zeros, and BatchNorm counters are 0 (our reverse direction writes a fresh counter).
  """
  rng = np.random.default_rng(3)
  state = {}
  tensor = lambda key, *shape: state.__setitem__(key, torch.from_numpy(rng.normal(size=shape).astype(np.float32)))

  def bn(prefix, c):
    for leaf in ('weight', 'bias', 'running_mean'):
      tensor(f'{prefix}.{leaf}', c)
    state[f'{prefix}.running_var'] = torch.from_numpy(rng.uniform(0.5, 2, size=c).astype(np.float32))
    state[f'{prefix}.num_batches_tracked'] = torch.tensor(0)

  widths = [3 if code == 'cifar' else 2, dim // 8, dim // 4, dim // 2, dim, dim]
  names = ['proj_conv', 'proj_conv1', 'proj_conv2', 'proj_conv3', 'rpe_conv']
  for k, name in enumerate(names):
    tensor(f'patch_embed.{name}.weight', widths[k + 1], widths[k], 3, 3)
    bn(f'patch_embed.{name.replace("conv", "bn")}', widths[k + 1])

  def dense(key, cin, cout, bias):  # CIFAR: nn.Linear [out, in]; DVS: Conv1d [out, in, 1].
    kind = 'linear' if code == 'cifar' else 'conv'
    tensor(f'{key}_{kind}.weight', *((cout, cin) if code == 'cifar' else (cout, cin, 1)))
    if bias:
      tensor(f'{key}_{kind}.bias', cout)

  for i in range(depth):
    for name in ('q', 'k', 'v', 'proj'):
      dense(f'block.{i}.attn.{name}', dim, dim, bias=code == 'cifar' or name == 'proj')
      bn(f'block.{i}.attn.{name}_bn', dim)
    dense(f'block.{i}.mlp.fc1', dim, hidden, bias=True)
    bn(f'block.{i}.mlp.fc1_bn', hidden)
    dense(f'block.{i}.mlp.fc2', hidden, dim, bias=True)
    bn(f'block.{i}.mlp.fc2_bn', dim)
    for norm in ('norm1', 'norm2'):
      state[f'block.{i}.{norm}.weight'], state[f'block.{i}.{norm}.bias'] = torch.ones(dim), torch.zeros(dim)
  if code == 'dvs':
    state['pos_embed'] = torch.zeros(1, tokens, dim)
    state['norm.weight'], state['norm.bias'] = torch.ones(dim), torch.zeros(dim)
  tensor('head.weight', classes, dim)
  tensor('head.bias', classes)
  return state


@pytest.mark.parametrize('code,variant', [('cifar', 'spikformer-cifar-4-384'), ('dvs', 'spikformer-dvs-2-256')])
def test_reference_spikformer_state_dict_round_trip_is_exact(tmp_path, code, variant):
  # DVS: 128x128 frames through four stride-2 pools -> 8x8 = 64 tokens (the reference's pos_embed).
  state = spikformer_reference_state(code, tokens=64)
  torch.save({'state_dict': state}, tmp_path / 'ref.pth')
  meta = convert.torch_to_weights(tmp_path / 'ref.pth', variant, tmp_path / 'w', depth=1, embed_dim=32, num_heads=4)
  assert meta['model_overrides'] == {'depth': 1, 'embed_dim': 32, 'num_heads': 4, 'num_classes': 5}
  variables, _ = weights.load_weights(tmp_path / 'w')
  q = variables['params']['block_0']['attn']['q_conv']['dense']
  q_weight = state['block.0.attn.q_linear.weight' if code == 'cifar' else 'block.0.attn.q_conv.weight'].numpy()
  np.testing.assert_array_equal(q['kernel'], q_weight.reshape(32, 32).T)  # y = x W^T + b
  if code == 'cifar':
    np.testing.assert_array_equal(q['bias'], state['block.0.attn.q_linear.bias'].numpy())
  else:
    assert 'bias' not in q
  # The model runs with these weights.
  model = weights.build_model_from_meta(meta)
  x = np.random.default_rng(0).normal(size=(1,) + registry.get_spec(variant).input_shape).astype(np.float32)
  logits = model.apply(variables, x)
  assert logits.shape == (1, 5) and np.all(np.isfinite(logits))

  back = convert.weights_to_torch(tmp_path / 'w', tmp_path / 'back.pth')
  assert back.keys() == state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  reloaded = torch.load(tmp_path / 'back.pth', weights_only=True)['state_dict']
  assert all(reloaded[k].shape == v.shape for k, v in state.items())


def test_spikformer_checkpoint_of_another_reference_code_is_refused(tmp_path):
  torch.save(spikformer_reference_state('cifar'), tmp_path / 'cifar.pth')
  for variant in ('spikformer-8-384', 'spikformer-dvs-2-256'):
    with pytest.raises(convert.ConversionError, match='cifar Spikformer code.*spikformer-cifar-'):
      convert.torch_to_weights(tmp_path / 'cifar.pth', variant, tmp_path / 'w', depth=1, embed_dim=32, num_heads=4)
  torch.save(spikformer_reference_state('dvs', tokens=64), tmp_path / 'dvs.pth')
  with pytest.raises(convert.ConversionError, match='dvs Spikformer code.*spikformer-dvs-'):
    convert.torch_to_weights(tmp_path / 'dvs.pth', 'spikformer-cifar-4-384', tmp_path / 'w', depth=1, embed_dim=32,
                             num_heads=4)
  assert not (tmp_path / 'w').exists()


def test_timm_checkpoint_entries_and_layouts(tmp_path):
  """A real timm CheckpointSaver dict (argparse.Namespace args, optimizer state) loads with weights_only."""
  variables, state = random_torch_state('spikingformer-8-384', depth=1, embed_dim=32, num_heads=4)
  ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
  checkpoint = {'epoch': 284, 'arch': 'vit_snn', 'state_dict': state, 'state_dict_ema': ema,
                'optimizer': {'state': {0: {'exp_avg': torch.zeros(3)}}, 'param_groups': [{'lr': 5e-4}]},
                'args': argparse.Namespace(model='vit_snn', lr=5e-4, dim=32), 'metric': 75.85, 'version': 2}
  torch.save(checkpoint, tmp_path / 'timm.pth.tar')

  for key, expected in (('', variables), ('state_dict_ema', jax.tree.map(lambda a: a + 1, variables))):
    out = tmp_path / f'w{key}'
    convert.torch_to_weights(tmp_path / 'timm.pth.tar', 'spikingformer-8-384', out, depth=1, embed_dim=32,
                             num_heads=4, checkpoint_key=key)
    loaded, meta = weights.load_weights(out)
    assert meta['model_overrides']['num_classes'] == 1000
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  # Conv weights went OIHW -> HWIO and the Conv1d [out, in, 1] -> Dense [in, out].
  np.testing.assert_array_equal(loaded['params']['tokenizer']['stage1']['conv']['kernel'],
                                np.transpose(ema['patch_embed.proj1_conv.weight'].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(loaded['params']['block_0']['attn']['q_conv']['dense']['kernel'],
                                ema['block.0.attn.q_conv.weight'].numpy()[:, :, 0].T)
  np.testing.assert_array_equal(loaded['batch_stats']['block_0']['mlp']['mlp2_bn']['var'],
                                ema['block.0.mlp.mlp2_bn.running_var'].numpy())


# ---------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, nothing written.


@pytest.fixture(scope='module')
def small_cifar_state():
  return random_torch_state('spikingformer-cifar-4-384', depth=2, embed_dim=32, num_heads=4)[1]


def test_truncated_file(tmp_path, small_cifar_state):
  torch.save({'state_dict': small_cifar_state}, tmp_path / 'ckpt.pth')
  data = (tmp_path / 'ckpt.pth').read_bytes()
  (tmp_path / 'ckpt.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match=r'Could not read PyTorch checkpoint .*ckpt.pth \(truncated'):
    convert.main(cli_args(tmp_path / 'ckpt.pth', 'spikingformer-cifar-4-384', tmp_path / 'w', depth=2,
                          embed_dim=32))
  assert_nothing_written(tmp_path, 'ckpt.pth')


def test_missing_file(tmp_path):
  with pytest.raises(convert.ConversionError, match='does not exist'):
    convert.torch_to_weights(tmp_path / 'nope.pth', 'spikingformer-8-768', tmp_path / 'w')


class RunsShellCommand:
  """Unpickling this calls os.system: what a malicious checkpoint does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_pickle_with_code_is_refused_without_running_it(tmp_path, small_cifar_state):
  marker = tmp_path / 'pwned'
  torch.save({'state_dict': small_cifar_state, 'payload': RunsShellCommand(f'touch {marker}')},
             tmp_path / 'evil.pth')
  with pytest.raises(convert.ConversionError,
                     match=r'Refusing to load .*evil.pth.*GLOBAL (posix|os)\.system.*arbitrary code'):
    convert.main(cli_args(tmp_path / 'evil.pth', 'spikingformer-cifar-4-384', tmp_path / 'w', depth=2,
                          embed_dim=32))
  assert not marker.exists()
  assert_nothing_written(tmp_path, 'evil.pth')
  torch.load(tmp_path / 'evil.pth', weights_only=False)  # The payload is live: an unsafe load runs it.
  assert marker.exists()


def test_resnet_state_dict_is_rejected_listing_every_key(tmp_path):
  resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.weight': torch.ones(64), 'bn1.bias': torch.zeros(64),
            'bn1.running_mean': torch.zeros(64), 'bn1.running_var': torch.ones(64),
            'layer1.0.conv1.weight': torch.zeros(64, 64, 3, 3), 'fc.weight': torch.zeros(1000, 512),
            'fc.bias': torch.zeros(1000)}
  torch.save({'state_dict': resnet}, tmp_path / 'resnet.pth')
  with pytest.raises(convert.ConversionError) as info:
    convert.main(cli_args(tmp_path / 'resnet.pth', 'spikingformer-8-768', tmp_path / 'w'))
  message = str(info.value)
  model = registry.get_model('spikingformer-8-768')
  for rule in torch_mapping.rules_for(model):
    assert f'missing key {rule.torch_key!r}' in message
  for key in resnet:
    assert f'unexpected key {key!r}' in message
  assert_nothing_written(tmp_path, 'resnet.pth')


@pytest.mark.parametrize('flags, message', [
    ({}, r'checkpoint has depth=2 but spikingformer-cifar-4-384 has depth=4.*\n.*embed_dim=32 but .* has '
         r'embed_dim=384 \(pick the matching variant or pass --embed_dim=32\)'),
    (dict(depth=3, embed_dim=32), r'--depth=3 but the checkpoint has depth=2'),
    (dict(depth=2, embed_dim=32, num_classes=100), r'--num_classes=100 but the checkpoint has num_classes=10'),
    (dict(depth=2, embed_dim=32), r"embed_dim=32 is not divisible by num_heads=12 \(spikingformer-cifar-4-384's\); "
                                  r'pass --num_heads'),
])
def test_architecture_mismatch(tmp_path, small_cifar_state, flags, message):
  torch.save({'state_dict': small_cifar_state}, tmp_path / 'ckpt.pth')
  with pytest.raises(convert.ConversionError, match=message):
    convert.main(cli_args(tmp_path / 'ckpt.pth', 'spikingformer-cifar-4-384', tmp_path / 'w', **flags))
  assert_nothing_written(tmp_path, 'ckpt.pth')


def test_wrong_tokenizer_layout(tmp_path, small_cifar_state):
  torch.save({'state_dict': small_cifar_state}, tmp_path / 'ckpt.pth')
  with pytest.raises(convert.ConversionError, match='has the cifar tokenizer .* but spikingformer-8-384 has the '
                                                    'imagenet one'):
    convert.main(cli_args(tmp_path / 'ckpt.pth', 'spikingformer-8-384', tmp_path / 'w', depth=2, embed_dim=32))
  assert_nothing_written(tmp_path, 'ckpt.pth')


def test_misshaped_and_missing_keys_are_all_listed(tmp_path, small_cifar_state):
  state = dict(small_cifar_state)
  state['block.1.attn.k_conv.weight'] = torch.zeros(32, 16, 1)
  state['patch_embed.block2_bn.running_var'] = torch.ones(7)
  del state['block.0.mlp.mlp2_bn.bias']
  state['block.0.attn.extra.weight'] = torch.zeros(3)
  torch.save({'state_dict': state}, tmp_path / 'ckpt.pth')
  with pytest.raises(convert.ConversionError) as info:
    convert.main(cli_args(tmp_path / 'ckpt.pth', 'spikingformer-cifar-4-384', tmp_path / 'w', depth=2,
                          embed_dim=32, num_heads=4))
  message = str(info.value)
  assert '4 problem(s)' in message
  assert "'block.1.attn.k_conv.weight': shape (16, 32) after layout change, model expects (32, 32)" in message
  assert "'patch_embed.block2_bn.running_var': shape (7,)" in message
  assert "missing key 'block.0.mlp.mlp2_bn.bias'" in message
  assert "unexpected key 'block.0.attn.extra.weight'" in message
  assert_nothing_written(tmp_path, 'ckpt.pth')


def test_existing_output_is_not_replaced(tmp_path, small_cifar_state):
  torch.save({'state_dict': small_cifar_state}, tmp_path / 'ckpt.pth')
  args = cli_args(tmp_path / 'ckpt.pth', 'spikingformer-cifar-4-384', tmp_path / 'w', depth=2, embed_dim=32,
                  num_heads=4)
  convert.main(args)
  with pytest.raises(convert.ConversionError, match='already exists; pass --overwrite'):
    convert.main(args)
  convert.main(args + ['--overwrite'])
  assert weights.is_weights_checkpoint(tmp_path / 'w')


def test_not_a_state_dict(tmp_path):
  torch.save({'epoch': 3, 'optimizer': {'lr': 0.1}}, tmp_path / 'opt.pth')
  with pytest.raises(convert.ConversionError, match=r"neither a state_dict nor a checkpoint dict.*\['epoch', "
                                                    r"'optimizer'\]"):
    convert.torch_to_weights(tmp_path / 'opt.pth', 'spikingformer-8-768', tmp_path / 'w')
  assert_nothing_written(tmp_path, 'opt.pth')


@pytest.mark.parametrize('kind', ['text', 'npz', 'plain pickle', 'directory'])
def test_a_file_that_is_not_a_torch_checkpoint_is_named_as_such(tmp_path, kind):
  path = tmp_path / 'model.pth'
  if kind == 'text':
    path.write_text('not a checkpoint\n')
  elif kind == 'npz':
    with path.open('wb') as f:
      np.savez(f, weight=np.zeros(3))
  elif kind == 'plain pickle':
    path.write_bytes(pickle.dumps({'weight': [0.0, 1.0]}))
  else:
    path.mkdir()
  with pytest.raises(convert.ConversionError, match=r'model.pth is not a PyTorch checkpoint: expected a file '
                                                    r'written by torch.save') as info:
    convert.torch_to_weights(path, 'spikingformer-8-768', tmp_path / 'w')
  assert 'weights_only' not in str(info.value) and 'pickles' not in str(info.value)


def test_legacy_torch_format_is_read(tmp_path):
  state = {'weight': torch.arange(3.0)}
  torch.save(state, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
  assert convert.read_torch_file(tmp_path / 'legacy.pth')['weight'].tolist() == [0.0, 1.0, 2.0]


def test_without_torch_the_cli_says_what_to_install(tmp_path):
  """torch is optional: the package imports without it, and the converter explains what is missing."""
  script = ('import runpy, sys\n'
            'sys.modules["torch"] = None  # makes `import torch` fail\n'
            'from spikingformer_jax.porting import convert, weights\n'
            f'sys.argv = ["convert", "--torch", "{tmp_path / "x.pth"}", "--variant", "spikingformer-8-768", '
            f'"--out", "{tmp_path / "w"}"]\n'
            'runpy.run_module("spikingformer_jax.porting.convert", run_name="__main__")\n')
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 1
  assert 'error: Converting PyTorch checkpoints needs torch, which is not installed' in result.stderr
  assert_nothing_written(tmp_path)
