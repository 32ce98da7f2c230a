"""The one mapping between the reference PyTorch state_dict and our Flax variables (both directions).

Pure NumPy, no torch: `convert.py` (checkpoint files) and the parity tests both use it. The rules
are generated from the model's own configuration, so every registered variant is covered.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
from flax import traverse_util

# How a tensor's layout changes from PyTorch to Flax.
LAYOUTS = {
    'conv': (lambda w: np.transpose(w, (2, 3, 1, 0)), lambda w: np.transpose(w, (3, 2, 0, 1))),  # OIHW<->HWIO
    'conv1d': (lambda w: np.transpose(w[:, :, 0]), lambda w: np.transpose(w)[:, :, None]),  # [o,i,1]<->[i,o]
    'conv2d_1x1': (lambda w: np.transpose(w[:, :, 0, 0]), lambda w: np.transpose(w)[:, :, None, None]),
    'linear': (np.transpose, np.transpose),
    'vector': (lambda w: w, lambda w: w),
}
IGNORED_SUFFIXES = ('num_batches_tracked',)
# The reference's unused LayerNorms, and the Spikformer DVS code's unused final LayerNorm and position embedding.
IGNORED_MODULES = ('.norm1.', '.norm2.', '.norm.')
IGNORED_KEYS = ('pos_embed',)


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_key: str
  path: tuple  # ('params' | 'batch_stats', module..., leaf)
  layout: str


def _bn_rules(torch_prefix: str, path: tuple) -> list[Rule]:
  return [Rule(f'{torch_prefix}.weight', ('params',) + path + ('scale',), 'vector'),
          Rule(f'{torch_prefix}.bias', ('params',) + path + ('bias',), 'vector'),
          Rule(f'{torch_prefix}.running_mean', ('batch_stats',) + path + ('mean',), 'vector'),
          Rule(f'{torch_prefix}.running_var', ('batch_stats',) + path + ('var',), 'vector')]


def tokenizer_layout(style: str, pool: tuple) -> str:
  """Which key names the reference used for this tokenizer: 'imagenet' (proj*), 'cifar' (block*)."""
  if style == 'spikformer':
    return 'spikformer'
  return 'imagenet' if pool[0] else 'cifar'


def _tokenizer_rules(layout: str) -> list[Rule]:
  rules = []
  for k in range(5):
    if layout == 'imagenet':
      conv, bn = ('proj_conv', 'proj_bn') if k == 0 else (f'proj{k}_conv', f'proj{k}_bn')
    elif layout == 'cifar':
      conv, bn = f'block{k}_conv', f'block{k}_bn'
    else:  # Spikformer SPS: proj_conv, proj_conv1..3, then rpe_conv.
      suffix = '' if k == 0 else str(k)
      conv, bn = (f'proj_conv{suffix}', f'proj_bn{suffix}') if k < 4 else ('rpe_conv', 'rpe_bn')
    path = ('tokenizer', f'stage{k}')
    rules.append(Rule(f'patch_embed.{conv}.weight', ('params',) + path + ('conv', 'kernel'), 'conv'))
    rules += _bn_rules(f'patch_embed.{bn}', path + ('bn',))
  return rules


def spikformer_code(model) -> str | None:
  """Which Spikformer reference code the model's checkpoints come from ('imagenet', 'cifar', 'dvs'); None otherwise.

  The three codes differ in module names and tensor layouts only: ImageNet has Conv1d q/k/v/proj and a
  Conv2d 1x1 MLP, DVS Conv1d everywhere, CIFAR nn.Linear everywhere (q/k/v with biases, `qkv_bias`).
  """
  if model.style != 'spikformer':
    return None
  if model.reference_code not in ('imagenet', 'cifar', 'dvs'):
    raise ValueError(f"reference_code must be 'imagenet', 'cifar' or 'dvs', got {model.reference_code!r}.")
  return model.reference_code


def _block_rules(i: int, model) -> list[Rule]:
  code = spikformer_code(model)
  attn_kind, attn_layout = ('linear', 'linear') if code == 'cifar' else ('conv', 'conv1d')
  mlp_kind, mlp_layout = {'cifar': ('linear', 'linear'), 'dvs': ('conv', 'conv1d')}.get(code, ('conv', 'conv2d_1x1'))
  rules = []
  pre = f'block.{i}'
  for name in ('q', 'k', 'v', 'proj'):
    path = ('params', f'block_{i}', 'attn', f'{name}_conv', 'dense')
    rules.append(Rule(f'{pre}.attn.{name}_{attn_kind}.weight', path + ('kernel',), attn_layout))
    if name == 'proj' or model.qkv_bias:
      rules.append(Rule(f'{pre}.attn.{name}_{attn_kind}.bias', path + ('bias',), 'vector'))
    rules += _bn_rules(f'{pre}.attn.{name}_bn', (f'block_{i}', 'attn', f'{name}_bn'))
  for j in (1, 2):
    torch_name = f'fc{j}_{mlp_kind}' if code else f'mlp{j}_conv'
    path = ('params', f'block_{i}', 'mlp', f'mlp{j}_conv', 'dense')
    rules.append(Rule(f'{pre}.mlp.{torch_name}.weight', path + ('kernel',), mlp_layout))
    rules.append(Rule(f'{pre}.mlp.{torch_name}.bias', path + ('bias',), 'vector'))
    bn = f'fc{j}_bn' if code else f'mlp{j}_bn'
    rules += _bn_rules(f'{pre}.mlp.{bn}', (f'block_{i}', 'mlp', f'mlp{j}_bn'))
  return rules


def rules_for(model) -> list[Rule]:
  """All rules for a `models.Spikingformer` module (its fields decide the layout)."""
  layout = tokenizer_layout(model.style, model.pool)
  rules = _tokenizer_rules(layout)
  for i in range(model.depth):
    rules += _block_rules(i, model)
  rules += [Rule('head.weight', ('params', 'head', 'kernel'), 'linear'),
            Rule('head.bias', ('params', 'head', 'bias'), 'vector')]
  return rules


def is_ignored(key: str) -> bool:
  return key.endswith(IGNORED_SUFFIXES) or key in IGNORED_KEYS or any(m in f'.{key}' for m in IGNORED_MODULES)


class MappingError(ValueError):
  """Raised with every missing, unexpected and mis-shaped key at once."""


def _check_all(problems: Iterable[str], what: str):
  problems = list(problems)
  if problems:
    raise MappingError(f'{what}: {len(problems)} problem(s):\n  ' + '\n  '.join(problems))


def torch_to_flax(state_dict: dict, model, expected_shapes: dict | None = None) -> dict:
  """Reference state_dict (name -> array) to Flax variables {'params': ..., 'batch_stats': ...}.

  `expected_shapes` (flattened path -> shape, e.g. from `jax.eval_shape(model.init, ...)`) turns
  shape mismatches into errors; every problem is listed, not just the first.
  """
  rules = rules_for(model)
  known = {r.torch_key for r in rules}
  problems = [f'missing key {r.torch_key!r}' for r in rules if r.torch_key not in state_dict]
  problems += [f'unexpected key {k!r}' for k in sorted(state_dict) if k not in known and not is_ignored(k)]
  flat = {}
  for r in rules:
    if r.torch_key not in state_dict:
      continue
    value = np.asarray(state_dict[r.torch_key], dtype=np.float32)
    try:
      value = LAYOUTS[r.layout][0](value)
    except (IndexError, ValueError) as e:
      problems.append(f'{r.torch_key!r} has shape {value.shape}, not a {r.layout} tensor ({e})')
      continue
    want = None if expected_shapes is None else tuple(expected_shapes.get(r.path, ()))
    if want is not None and tuple(value.shape) != want:
      problems.append(f'{r.torch_key!r}: shape {tuple(value.shape)} after layout change, model expects {want} '
                      f'at {"/".join(r.path)}')
      continue
    flat[r.path] = value
  _check_all(problems, 'The state_dict does not fit the model')
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables: dict, model, with_unused_norms: bool = False, num_tokens: int | None = None) -> dict:
  """Flax variables to a reference-named state_dict of NumPy arrays.

  The reference's unused LayerNorms are omitted unless `with_unused_norms`, which adds them as the
  identity (weight 1, bias 0) so that the reference model can `load_state_dict(..., strict=True)`.
  The Spikformer DVS code also holds an unused final LayerNorm and a `pos_embed` of `num_tokens`
  tokens (written as zeros; its values never reach the output).
  """
  flat = traverse_util.flatten_dict(dict(variables))
  rules = rules_for(model)
  _check_all([f'missing variable {"/".join(r.path)}' for r in rules if r.path not in flat],
             'The variables do not fit the model')
  state = {r.torch_key: LAYOUTS[r.layout][1](np.asarray(flat[r.path], np.float32)) for r in rules}
  for r in rules:  # PyTorch BatchNorm also carries a step counter.
    if r.torch_key.endswith('.running_mean'):
      state[r.torch_key.replace('running_mean', 'num_batches_tracked')] = np.asarray(0, np.int64)
  if with_unused_norms:
    for i in range(model.depth):
      for norm in ('norm1', 'norm2'):
        state[f'block.{i}.{norm}.weight'] = np.ones(model.embed_dim, np.float32)
        state[f'block.{i}.{norm}.bias'] = np.zeros(model.embed_dim, np.float32)
    if spikformer_code(model) == 'dvs':
      if num_tokens is None:
        raise ValueError('The Spikformer DVS state_dict holds pos_embed [1, tokens, dim]: pass num_tokens.')
      state['norm.weight'] = np.ones(model.embed_dim, np.float32)
      state['norm.bias'] = np.zeros(model.embed_dim, np.float32)
      state['pos_embed'] = np.zeros((1, num_tokens, model.embed_dim), np.float32)
  return state


def _tokenizer_lif_names(layout: str) -> dict[str, str]:
  if layout == 'spikformer':  # SPS: a LIF after each of the 5 Conv-BNs.
    return {f'lif{k}': ('proj_lif' + (str(k) if k else '')) if k < 4 else 'rpe_lif' for k in range(5)}
  prefix = 'proj' if layout == 'imagenet' else 'block'
  return {f'lif{k}': f'{prefix}{k}_lif' for k in range(1, 5)}


def reference_lif_names(model) -> dict[tuple, str]:
  """Module path of each of our LIFs (as sown in 'spikes', without the 'out' leaf) -> the reference's name.

  E.g. ('tokenizer', 'lif1') -> 'patch_embed.proj1_lif', ('block_0', 'mlp', 'mlp1_lif') ->
  'block.0.mlp.mlp1_lif' (Spikformer: 'block.0.mlp.fc1_lif').
  """
  layout = tokenizer_layout(model.style, model.pool)
  names = {('tokenizer', ours): f'patch_embed.{ref}' for ours, ref in _tokenizer_lif_names(layout).items()}
  mlp = 'fc' if model.style == 'spikformer' else 'mlp'
  for i in range(model.depth):
    for lif in ('proj_lif', 'q_lif', 'k_lif', 'v_lif', 'attn_lif'):
      names[(f'block_{i}', 'attn', lif)] = f'block.{i}.attn.{lif}'
    for j in (1, 2):
      names[(f'block_{i}', 'mlp', f'mlp{j}_lif')] = f'block.{i}.mlp.{mlp}{j}_lif'
  return names


def spikes_to_reference_layout(spikes: np.ndarray, reference_shape: tuple) -> np.ndarray:
  """Our channels-last spikes ([T, B, H, W, C] or [T, B, N, C]) in the reference's channels-first layout.

  The reference keeps [T, B, C, H, W] or [T, B, C, N] (N = H * W, row-major, like our tokens), so
  moving channels to axis 2 and reshaping covers every LIF, including those whose token and
  spatial layouts differ between the two implementations.
  """
  spikes = np.moveaxis(np.asarray(spikes), -1, 2)
  if spikes.size != int(np.prod(reference_shape)):
    raise ValueError(f'Spikes of shape {spikes.shape} (channels first) cannot take the reference shape '
                     f'{tuple(reference_shape)}.')
  return spikes.reshape(tuple(reference_shape))
