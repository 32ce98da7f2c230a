"""Training checkpoints with Orbax: async saves, keep-latest-K plus the best, exact resumption.

A training checkpoint (one step directory under `<workdir>/checkpoints`) holds three items:
  state      {'step', 'params', 'batch_stats', 'opt_state'} (sharded arrays, restored onto the mesh)
  data_iter  the grain iterator state, so training resumes at the very next batch
  meta       model name/overrides and the eval metrics of that step
Orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint is never listed as a step; one whose files are damaged fails with a `CheckpointError`
naming its directory.
"""
from __future__ import annotations

import base64
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from spikingformer_jax import weights

ITEMS = ('state', 'data_iter', 'meta')


class CheckpointError(RuntimeError):
  pass


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / 'checkpoints'


def make_manager(workdir, ckpt_cfg, best_metric: str) -> ocp.CheckpointManager:
  keep = [policies.LatestN(n=int(ckpt_cfg.keep))]
  if ckpt_cfg.keep_best:
    keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=True))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
      cleanup_tmp_directories=True,  # Leftovers of an interrupted save are removed, never restored.
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def _encode_iter_state(state) -> dict:
  if isinstance(state, bytes):
    return {'bytes_b64': base64.b64encode(state).decode('ascii')}
  return {'json': state}


def _decode_iter_state(stored: dict):
  return base64.b64decode(stored['bytes_b64']) if 'bytes_b64' in stored else stored['json']


def save(manager, step: int, state: dict, data_iter_state, meta: dict, metrics: Optional[dict] = None,
         force: bool = False) -> bool:
  """Queues an (async) save; returns whether one was started."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(_encode_iter_state(data_iter_state)),
      meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)


def restore(manager, step: int, abstract_state) -> tuple[Any, Any, dict]:
  """(state placed per `abstract_state`'s shardings, iterator state, meta) of `step`."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax/TensorStore raise many types for damaged data.
    raise CheckpointError(f'Checkpoint step {step} in {manager.directory} cannot be restored '
                          f'({type(e).__name__}: {e}). Delete that step directory to fall back to an earlier '
                          'one.') from e
  return restored['state'], _decode_iter_state(restored['data_iter']), restored['meta']


def _resolve_training_step_dir(path: pathlib.Path) -> pathlib.Path:
  """A workdir, its checkpoints/ dir, or one step dir -> the step dir (latest when not given)."""
  if (path / 'state').is_dir():
    return path
  ckpts = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  steps = sorted((int(p.name), p) for p in ckpts.iterdir() if p.name.isdigit() and (p / 'state').is_dir()) \
      if ckpts.is_dir() else []
  if not steps:
    raise CheckpointError(f'{path}: no complete training checkpoint (expected a workdir, its checkpoints/ '
                          'directory, a step directory, or a weights checkpoint written by convert).')
  return steps[-1][1]


def load_variables(path) -> dict:
  """{'params', 'batch_stats'} as host arrays from a weights checkpoint or any training checkpoint path."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f'{path} does not exist.')
  if weights.is_weights_checkpoint(path):
    return weights.load_weights(path)[0]
  step_dir = _resolve_training_step_dir(path)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(step_dir / 'state').item_metadata.tree
      # ShapeDtypeStructs without shardings restore as host arrays, whatever mesh wrote them.
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
      restored = checkpointer.restore(step_dir / 'state', target)
  except Exception as e:
    raise CheckpointError(f'{step_dir}: cannot read the model variables ({type(e).__name__}: {e}).') from e
  return {k: jax.tree_util.tree_map(np.asarray, restored[k]) for k in ('params', 'batch_stats')}
