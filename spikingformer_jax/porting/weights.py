"""Standalone "weights" checkpoints: a model's variables plus what is needed to rebuild the model.

Layout of a weights directory:

  variables/      Orbax checkpoint of {'params', 'batch_stats'}
  weights.json    {'format', 'version', 'model_name', 'model_overrides', 'source'}
  COMMITTED       empty; written last

`save_weights` writes everything into a hidden temporary directory next to the target and moves
it into place only once complete (`paths.move_tree`: a rename locally; on gs:// a copy whose
COMMITTED marker lands last), so a crash leaves either no complete target or a complete one. This is a
single-process tool (conversion, export); multi-host training keeps its own Orbax checkpoints.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from spikingformer_jax import models, paths, registry

FORMAT = 'spikingformer-jax-weights'
VERSION = 1
VARIABLES_DIR = 'variables'
META_FILE = 'weights.json'
COMMIT_FILE = 'COMMITTED'
COLLECTIONS = ('params', 'batch_stats')
_META_FIELDS = {'format': str, 'version': int, 'model_name': str, 'model_overrides': dict, 'source': str}


class WeightsError(ValueError):
  """A weights checkpoint that is absent, incomplete, corrupt or does not fit its model."""


def is_weights_checkpoint(directory) -> bool:
  """Whether `directory` is a complete weights checkpoint (as opposed to, e.g., a training checkpoint)."""
  directory = epath.Path(directory)
  return (directory / COMMIT_FILE).exists() and (directory / META_FILE).exists()


def build_model_from_meta(meta: dict):
  """The Flax module a weights checkpoint belongs to."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  try:
    return registry.get_model(meta['model_name'], **overrides)
  except (ValueError, TypeError) as e:
    raise WeightsError(f'Cannot build model {meta["model_name"]!r} with overrides {overrides}: {e}') from None


def expected_shapes(model, model_name: str) -> dict:
  """Flattened (collection, ..., leaf) -> shape of the model's variables, from shapes alone."""
  shape = tuple(registry.get_spec(model_name).input_shape)
  if len(shape) == 4:  # Frames [T, H, W, C]: T must follow a T override.
    shape = (model.T,) + shape[1:]
  abstract = models.abstract_variables(model, (1,) + shape)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}


def _fit_problems(actual: dict, expected: dict) -> list[str]:
  """Every missing, unexpected and mis-shaped variable (flattened path -> shape on both sides)."""
  name = '/'.join
  problems = [f'missing {name(k)} {expected[k]}' for k in sorted(expected) if k not in actual]
  problems += [f'unexpected {name(k)} {actual[k]}' for k in sorted(actual) if k not in expected]
  problems += [f'{name(k)} has shape {actual[k]}, the model expects {expected[k]}'
               for k in sorted(expected) if k in actual and actual[k] != expected[k]]
  return problems


def _check_fit(actual: dict, meta: dict, where: str):
  model = build_model_from_meta(meta)
  problems = _fit_problems(actual, expected_shapes(model, meta['model_name']))
  if problems:
    raise WeightsError(f'{where}: the variables do not fit {meta["model_name"]} with overrides '
                       f'{meta["model_overrides"]} ({len(problems)} problem(s)):\n  ' + '\n  '.join(problems))


def _json_safe(overrides: dict) -> dict:
  try:
    return json.loads(json.dumps(overrides))
  except TypeError as e:
    raise WeightsError(f'model_overrides must be JSON values (numbers, strings, lists), got {overrides!r}: {e}') \
        from None


def save_weights(directory, variables: dict, *, model_name: str, model_overrides: dict, source: str,
                 overwrite: bool = False) -> epath.Path:
  """Writes `variables` ({'params', 'batch_stats'}) and their model's description to `directory`, atomically.

  The variables are checked against `registry.get_model(model_name, **model_overrides)` first, so a
  checkpoint that would not load is never written. An existing `directory` is an error unless
  `overwrite` (and then it must itself be a weights checkpoint, so a typo cannot delete other data).
  """
  directory = epath.Path(directory)
  if set(variables) != set(COLLECTIONS):
    raise WeightsError(f'Weights must be exactly the collections {COLLECTIONS}, got {sorted(variables)}.')
  meta = {'format': FORMAT, 'version': VERSION, 'model_name': model_name,
          'model_overrides': _json_safe(dict(model_overrides)), 'source': str(source)}
  flat_shapes = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
  _check_fit(flat_shapes, meta, f'Not saving weights to {directory}')
  if directory.exists():
    if not overwrite:
      raise WeightsError(f'{directory} already exists; pass overwrite=True (--overwrite) to replace it.')
    if not is_weights_checkpoint(directory):
      raise WeightsError(f'Refusing to overwrite {directory}: it is not a weights checkpoint '
                         f'(no {META_FILE} and {COMMIT_FILE}).')
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.parent / f'.{directory.name}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    tmp.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / VARIABLES_DIR, {k: variables[k] for k in COLLECTIONS})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tmp / COMMIT_FILE).write_text('')
    if directory.exists():  # overwrite: move the old one aside, then swap.
      old = directory.parent / f'.{directory.name}.old-{uuid.uuid4().hex[:8]}'
      paths.move_tree(directory, old)
      paths.move_tree(tmp, directory)
      old.rmtree()
    else:
      paths.move_tree(tmp, directory)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
  return directory


def read_meta(directory) -> dict:
  """The metadata of a complete weights checkpoint, validated; a clear error for anything else."""
  directory = epath.Path(directory)
  if not directory.exists():
    raise WeightsError(f'No weights checkpoint at {directory}: the directory does not exist.')
  if not directory.is_dir():
    raise WeightsError(f'No weights checkpoint at {directory}: it is a file, not a directory.')
  if not (directory / COMMIT_FILE).exists():
    present = sorted(p.name for p in directory.iterdir())
    raise WeightsError(f'{directory} is not a complete weights checkpoint: it has no {COMMIT_FILE} marker '
                       f'(a save that did not finish, or another kind of directory). It contains: {present}.')
  meta_path = directory / META_FILE
  if not meta_path.exists():
    raise WeightsError(f'{directory} is corrupt: {META_FILE} is missing.')
  try:
    meta = json.loads(meta_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsError(f'{meta_path} is corrupt: not valid JSON ({e}).') from None
  if not isinstance(meta, dict):
    raise WeightsError(f'{meta_path} is corrupt: expected a JSON object, got {type(meta).__name__}.')
  for field, kind in _META_FIELDS.items():
    if not isinstance(meta.get(field), kind):
      raise WeightsError(f'{meta_path} is corrupt: field {field!r} should be a {kind.__name__}, '
                         f'got {meta.get(field)!r}.')
  if meta['format'] != FORMAT or meta['version'] > VERSION:
    raise WeightsError(f'{meta_path}: format {meta["format"]!r} version {meta["version"]} is not '
                       f'{FORMAT!r} version <= {VERSION}.')
  if meta['model_name'] not in registry.names(registry.VISION):
    raise WeightsError(f'{meta_path}: unknown model_name {meta["model_name"]!r}.')
  return meta


def load_weights(directory) -> tuple[dict[str, Any], dict]:
  """(variables as NumPy arrays, metadata) of a weights checkpoint written by `save_weights`."""
  directory = epath.Path(directory)
  meta = read_meta(directory)
  path = directory / VARIABLES_DIR
  if not path.exists():
    raise WeightsError(f'{directory} is corrupt: the {VARIABLES_DIR}/ Orbax checkpoint is missing.')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(path).item_metadata
      if stored is None:
        raise WeightsError(f'{directory} is corrupt: the {VARIABLES_DIR}/ Orbax checkpoint has no readable '
                           'array metadata.')
      flat = traverse_util.flatten_dict(stored.tree)
      _check_fit({k: tuple(v.shape) for k, v in flat.items()}, meta, f'{directory}')
      # ShapeDtypeStructs without a sharding restore as host NumPy arrays.
      target = traverse_util.unflatten_dict(
          {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in flat.items()})
      variables = checkpointer.restore(path, target)
  except WeightsError:
    raise
  except Exception as e:  # Orbax/TensorStore raise many types for unreadable data.
    raise WeightsError(f'{directory}: could not read the {VARIABLES_DIR}/ Orbax checkpoint '
                       f'({type(e).__name__}: {e}).') from e
  return variables, meta
