"""Converts the reference PyTorch checkpoints to weights checkpoints, and back.

  python -m spikingformer_jax.porting.convert --torch=checkpoint-284.pth.tar --variant=spikingformer-8-768 --out=DIR
  python -m spikingformer_jax.porting.convert --reverse --weights=DIR --out=model.pth

Forward: reads a timm checkpoint dict (weights under 'state_dict', else 'model', else
'state_dict_ema'; `--checkpoint_key` picks one) or a bare state_dict, strips a DDP 'module.'
prefix, infers num_classes/depth/embed_dim/mlp_ratio from the tensors and checks them against the
variant and any explicit flags, maps every tensor through `torch_mapping` and writes a weights
checkpoint (`weights.py`). Files are read with `torch.load(weights_only=True)`, so a checkpoint
that would run code when unpickled is refused. Nothing is written unless everything succeeds.

Reverse: writes {'state_dict': ..., 'arch': model name} with the reference's key names, BatchNorm
step counters and identity LayerNorms, which the reference model loads with strict=True.

torch is needed only here and is imported lazily.
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import sys
import zipfile

import numpy as np
from etils import epath

from spikingformer_jax import models, registry
from spikingformer_jax.porting import torch_mapping, weights

STATE_DICT_KEYS = ('state_dict', 'model', 'state_dict_ema')  # Auto-detection order.
DDP_PREFIX = 'module.'


class ConversionError(ValueError):
  """A checkpoint that cannot be read or does not fit the requested model."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError('Converting PyTorch checkpoints needs torch, which is not installed. Install the CPU '
                          'build, e.g. `pip install torch==2.13.0 --index-url '
                          'https://download.pytorch.org/whl/cpu`.') from None
  return torch


# ---------------------------------------------------------------------------------------------------
# Reading PyTorch files.

# torch.save's two formats: a zip archive holding `<name>/data.pkl`, or (legacy) pickles that start with
# torch's magic number 0x1950a86a20f9469cfc6c pickled as a protocol-2 LONG1.
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


def _is_torch_file(path: epath.Path) -> bool:
  """Whether `path` starts like a torch.save file (a zip that cannot be listed counts: torch says why)."""
  with path.open('rb') as f:
    head = f.read(len(_LEGACY_MAGIC))
  if head.startswith(_LEGACY_MAGIC):
    return True
  if not head.startswith(_ZIP_MAGIC):
    return False
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as archive:
      return any(name.endswith('/data.pkl') or name == 'data.pkl' for name in archive.namelist())
  except zipfile.BadZipFile:  # truncated: torch.load reports it
    return True


def read_torch_file(path):
  """`torch.load` restricted to tensors and plain containers (plus the argparse.Namespace timm stores)."""
  torch = _import_torch()
  path = epath.Path(path)
  if not path.exists():
    raise ConversionError(f'PyTorch checkpoint {path} does not exist.')
  if path.is_dir() or not _is_torch_file(path):
    raise ConversionError(f'{path} is not a PyTorch checkpoint: expected a file written by torch.save (a .pth or '
                          '.pth.tar, e.g. the reference\'s checkpoint-<epoch>.pth.tar).')
  try:
    # timm's CheckpointSaver stores the training arguments as an argparse.Namespace, a plain attribute bag.
    with torch.serialization.safe_globals([argparse.Namespace]):
      with path.open('rb') as f:
        return torch.load(f, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch names the offending callable as 'GLOBAL module.name' (wording varies across versions).
    unsupported = sorted(set(re.findall(r'[Uu]nsupported (?:global: )?(GLOBAL [\w.]+)', str(e))))
    found = ', '.join(unsupported) or ' '.join(str(e).split())
    raise ConversionError(
        f'Refusing to load {path}: it pickles Python objects other than tensors and plain containers '
        f'({found}). Unpickling them could run arbitrary code, so '
        f'only weights_only checkpoints are accepted; re-save the state_dict alone if you trust the file.') from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
    raise ConversionError(f'Could not read PyTorch checkpoint {path} (truncated or not a torch file?): '
                          f'{type(e).__name__}: {e}') from None


def extract_state_dict(checkpoint, checkpoint_key: str = '', origin: str = 'checkpoint') -> dict[str, np.ndarray]:
  """The state_dict inside a loaded checkpoint, as float32/int NumPy arrays with any 'module.' prefix removed."""
  torch = _import_torch()
  if not isinstance(checkpoint, dict):
    raise ConversionError(f'{origin} holds a {type(checkpoint).__name__}, not a state_dict or checkpoint dict.')
  if checkpoint_key:
    if checkpoint_key not in checkpoint:
      raise ConversionError(f'{origin} has no {checkpoint_key!r} entry; its keys: {sorted(map(str, checkpoint))}.')
    state = checkpoint[checkpoint_key]
  elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
    state = checkpoint  # A bare state_dict.
  else:
    found = [k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)]
    if not found:
      raise ConversionError(f'{origin} is neither a state_dict nor a checkpoint dict with one of '
                            f'{STATE_DICT_KEYS}; its keys: {sorted(map(str, checkpoint))[:20]}.')
    state = checkpoint[found[0]]
  if not isinstance(state, dict) or not state:
    raise ConversionError(f'The state_dict in {origin} is empty or not a dict.')
  not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise ConversionError(f'The state_dict in {origin} has non-tensor entries: {not_tensors[:10]}.')
  if all(k.startswith(DDP_PREFIX) for k in state):
    state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
  return {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).numpy()
          for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------
# Checking a state_dict against a variant.


def infer_architecture(state: dict) -> dict:
  """The model fields the tensor shapes determine (those that can be found; missing keys are left out)."""
  found = {}
  blocks = sorted({int(m.group(1)) for k in state for m in [re.match(r'block\.(\d+)\.', k)] if m})
  if blocks:
    found['depth'] = len(blocks)
    if blocks != list(range(len(blocks))):
      raise ConversionError(f'Blocks are not numbered 0..{len(blocks) - 1}: found indices {blocks}.')
  head = state.get('head.weight')
  if head is not None and head.ndim == 2:
    found['num_classes'], found['embed_dim'] = map(int, head.shape)
  hidden = next((state[k] for k in ('block.0.mlp.mlp1_conv.weight', 'block.0.mlp.fc1_conv.weight',
                                     'block.0.mlp.fc1_linear.weight') if k in state), None)
  if hidden is not None and 'embed_dim' in found:
    found['mlp_ratio'] = hidden.shape[0] / found['embed_dim']
  return found


def detect_tokenizer_layout(state: dict) -> str | None:
  if 'patch_embed.rpe_conv.weight' in state:
    return 'spikformer'
  if 'patch_embed.block0_conv.weight' in state:
    return 'cifar'
  if 'patch_embed.proj1_conv.weight' in state:
    return 'imagenet'
  return None


def detect_spikformer_code(state: dict) -> str | None:
  """Which Spikformer reference code wrote `state`: Linear q/k/v (cifar), Conv1d (dvs) or Conv2d (imagenet) MLP."""
  if 'block.0.attn.q_linear.weight' in state:
    return 'cifar'
  fc1 = state.get('block.0.mlp.fc1_conv.weight')
  if fc1 is not None and fc1.ndim in (3, 4):
    return 'dvs' if fc1.ndim == 3 else 'imagenet'
  return None


def resolve_overrides(state: dict, variant: str, requested: dict) -> dict:
  """Model overrides for `variant` that make it fit `state`; an error naming every disagreement.

  num_classes follows the head (fine-tuned heads are common) unless requested explicitly; depth,
  embed_dim and mlp_ratio must match the variant or the explicitly requested values. num_heads
  cannot be seen in the tensors: it is the variant's unless requested.
  """
  spec = registry.get_spec(variant)
  defaults = {f.name: f.default for f in dataclasses.fields(models.Spikingformer)}
  overrides = {k: v for k, v in requested.items() if v is not None}
  problems = []
  for field, value in infer_architecture(state).items():
    if field in overrides:
      if overrides[field] != value:
        problems.append(f'--{field}={overrides[field]} but the checkpoint has {field}={value}')
    elif field == 'num_classes':
      overrides[field] = value
    elif value != (variant_value := spec.kwargs.get(field, defaults[field])):
      problems.append(f'the checkpoint has {field}={value} but {variant} has {field}={variant_value} '
                      f'(pick the matching variant or pass --{field}={value})')
  if problems:
    raise ConversionError(f'The checkpoint does not match variant {variant}:\n  ' + '\n  '.join(problems))
  dim = overrides.get('embed_dim', spec.kwargs['embed_dim'])
  heads = overrides.get('num_heads', spec.kwargs['num_heads'])
  if dim % heads:
    whose = '' if 'num_heads' in overrides else f" ({variant}'s)"
    raise ConversionError(f'embed_dim={dim} is not divisible by num_heads={heads}{whose}; pass --num_heads '
                          '(the tensors do not show the number of heads).')
  model = spec.build(**overrides)
  want = torch_mapping.tokenizer_layout(model.style, model.pool)
  have = detect_tokenizer_layout(state)
  if have is not None and have != want:
    raise ConversionError(f'The checkpoint has the {have} tokenizer (patch_embed key names) but {variant} has '
                          f'the {want} one; pick a {have} variant.')
  want_code, have_code = torch_mapping.spikformer_code(model), detect_spikformer_code(state)
  if want_code and have_code and have_code != want_code:
    raise ConversionError(f'The checkpoint comes from the {have_code} Spikformer code (its q/k/v and MLP layers) but '
                          f'{variant} follows the {want_code} one; pick a spikformer{"" if have_code == "imagenet" else "-" + have_code}-* variant.')
  return overrides


def state_dict_to_variables(state: dict, variant: str, overrides: dict) -> dict:
  model = registry.get_model(variant, **overrides)
  shapes = weights.expected_shapes(model, variant)
  return torch_mapping.torch_to_flax(state, model, expected_shapes=shapes)


# ---------------------------------------------------------------------------------------------------
# The two directions.


def torch_to_weights(torch_path, variant: str, out, *, num_classes: int | None = None, depth: int | None = None,
                     embed_dim: int | None = None, num_heads: int | None = None, mlp_ratio: float | None = None,
                     checkpoint_key: str = '', overwrite: bool = False) -> dict:
  """Converts a PyTorch checkpoint file into the weights checkpoint `out`; returns its metadata."""
  out = epath.Path(out)
  if out.exists() and not overwrite:  # Fail before the (slow) load.
    raise ConversionError(f'{out} already exists; pass --overwrite to replace it.')
  if variant not in registry.names(registry.VISION):
    raise ConversionError(f'Unknown variant {variant!r}; registered: {", ".join(registry.names(registry.VISION))}.')
  state = extract_state_dict(read_torch_file(torch_path), checkpoint_key, origin=str(torch_path))
  requested = dict(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                   mlp_ratio=mlp_ratio)
  overrides = resolve_overrides(state, variant, requested)
  try:
    variables = state_dict_to_variables(state, variant, overrides)
  except torch_mapping.MappingError as e:
    raise ConversionError(f'{torch_path} does not fit {variant} with overrides {overrides}: {e}') from None
  weights.save_weights(out, variables, model_name=variant, model_overrides=overrides,
                       source=f'converted from PyTorch checkpoint {torch_path}', overwrite=overwrite)
  return weights.read_meta(out)


def weights_to_torch(weights_dir, out, *, variant: str | None = None, overwrite: bool = False) -> dict:
  """Writes a weights checkpoint as a reference-named PyTorch checkpoint file; returns its state_dict."""
  torch = _import_torch()
  out = epath.Path(out)
  if out.exists() and not overwrite:
    raise ConversionError(f'{out} already exists; pass --overwrite to replace it.')
  variables, meta = weights.load_weights(weights_dir)
  if variant and variant != meta['model_name']:
    raise ConversionError(f'--variant={variant} but {weights_dir} holds {meta["model_name"]}.')
  model = weights.build_model_from_meta(meta)
  height, width = registry.get_spec(meta['model_name']).input_shape[-3:-1]
  halvings = sum(model.pool)  # Each max-pool (kernel 3, stride 2, padding 1) rounds up.
  num_tokens = -(-height // 2**halvings) * -(-width // 2**halvings)
  state = torch_mapping.flax_to_torch(variables, model, with_unused_norms=True, num_tokens=num_tokens)
  tensors = {k: torch.from_numpy(np.array(v, order='C')) for k, v in state.items()}  # 0-d counters stay 0-d.
  tmp = out.parent / f'.{out.name}.tmp'
  out.parent.mkdir(parents=True, exist_ok=True)
  try:
    with tmp.open('wb') as f:
      torch.save({'state_dict': tensors, 'arch': meta['model_name']}, f)
    tmp.rename(out)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return state


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m spikingformer_jax.porting.convert', description=__doc__.split('\n')[0])
  p.add_argument('--torch', help='PyTorch checkpoint to convert (forward direction).')
  p.add_argument('--weights', help='weights checkpoint directory to export (with --reverse).')
  p.add_argument('--out', required=True, help='what to write: a weights directory, or with --reverse a .pth file.')
  p.add_argument('--variant', help='registered model name, e.g. spikingformer-8-768 (with --reverse: optional, '
                 'checked against the checkpoint).')
  p.add_argument('--reverse', action='store_true', help='weights checkpoint -> PyTorch state_dict.')
  p.add_argument('--num_classes', type=int)
  p.add_argument('--depth', type=int)
  p.add_argument('--embed_dim', type=int)
  p.add_argument('--num_heads', type=int, help='not visible in the tensors: the variant\'s unless given.')
  p.add_argument('--mlp_ratio', type=float)
  p.add_argument('--checkpoint_key', default='', help=f'entry holding the weights; default: first of '
                 f'{STATE_DICT_KEYS} present, or the file itself if it is a bare state_dict.')
  p.add_argument('--overwrite', action='store_true')
  args = p.parse_args(argv)
  if args.reverse:
    if not args.weights or args.torch:
      p.error('--reverse reads --weights=DIR and writes --out=FILE.pth (no --torch).')
  elif not args.torch or not args.variant or args.weights:
    p.error('converting needs --torch=FILE, --variant=NAME and --out=DIR (--weights is for --reverse).')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.reverse:
    state = weights_to_torch(args.weights, args.out, variant=args.variant, overwrite=args.overwrite)
    print(f'Wrote {len(state)} tensors to {args.out}.')
  else:
    meta = torch_to_weights(args.torch, args.variant, args.out, num_classes=args.num_classes, depth=args.depth,
                            embed_dim=args.embed_dim, num_heads=args.num_heads,
                            mlp_ratio=args.mlp_ratio, checkpoint_key=args.checkpoint_key,
                            overwrite=args.overwrite)
    print(f'Wrote {meta["model_name"]} {meta["model_overrides"]} to {args.out}.')
  return 0


def cli():
  """`spikingformer-convert`: `main` with its errors as one line and exit status 1."""
  try:
    sys.exit(main())
  except (ConversionError, weights.WeightsError, torch_mapping.MappingError) as err:
    sys.exit(f'error: {err}')


if __name__ == '__main__':
  cli()
