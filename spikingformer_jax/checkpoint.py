"""Training checkpoints with Orbax, local or gs://: async saves, keep-latest-K plus the best, exact resumption.

A training checkpoint (one step directory under `<workdir>/checkpoints`) holds:
  state      {'step', 'params', 'batch_stats', 'opt_state'} (sharded arrays: each process writes its shards)
  data_iter  every process's grain iterator position (grain's Orbax handler: one JSON file per process)
  meta       model name/overrides, the eval metrics of that step and (a run on a time budget) the wall time spent
  metrics    what keep-best ranks by, stored with the step so that retention also covers steps that
             earlier runs in the workdir wrote
Orbax lists a step only once it is complete (renamed into place locally, commit_success.txt on
gs://). What can still go wrong is handled without losing anything:
- a save that fails (disk full, permissions) raises a `CheckpointError` naming the step directory
  and the cause, at the next step for an async save; earlier checkpoints are never removed for it;
- a listed step that cannot be restored is moved aside to `<workdir>/damaged_checkpoints/` and
  the run falls back to the newest step that restores, with a warning;
- a step that does not fit the model (another config) is an error, not damage: nothing is moved.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from spikingformer_jax import paths
from spikingformer_jax.porting import weights

DAMAGED_DIR = 'damaged_checkpoints'
# What Orbax, TensorStore and grain raise for missing, truncated or garbled files. Anything else
# (a bug, an interrupt) propagates: it must never get intact checkpoints moved aside.
DAMAGE = (OSError, ValueError, KeyError, RuntimeError, EOFError)


class CheckpointError(RuntimeError):
  pass


def checkpoint_dir(workdir):
  return paths.path(workdir) / 'checkpoints'


def _one_line(error: BaseException, limit: int = 600) -> str:
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit] + ' ...'


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpoints:
  """The trainer's checkpoints in `<workdir>/checkpoints` (an Orbax CheckpointManager underneath)."""

  def __init__(self, workdir, ckpt_cfg, best_metric: str):
    self.workdir = paths.path(workdir)
    keep = [policies.LatestN(n=int(ckpt_cfg.keep))]
    best = {}
    if ckpt_cfg.keep_best:
      rank = lambda metrics: metrics.get(best_metric, -np.inf)
      keep.append(policies.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False))
      best = dict(best_fn=rank, best_mode='max')  # best_fn also makes Orbax store each step's metrics.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        cleanup_tmp_directories=True,  # Leftovers of an interrupted save are removed, never restored.
        **best)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=('state', 'data_iter', 'meta'))
    self.directory = self.manager.directory
    self._pending = None  # The step of a save that may still be running.

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  # -------------------------------------------------------------------------------------------------
  # Restoring.

  def restore_latest(self, abstract_state, data_iter) -> Optional[tuple[Any, dict, int]]:
    """(state, meta, step) of the newest step that restores, `data_iter` moved to its position; None if none.

    `abstract_state` gives each array's shape, dtype and sharding. Damaged steps met on the way
    are moved aside (warned). A step whose model variables do not fit `abstract_state` raises.
    """
    for step in reversed(self.manager.all_steps()):
      misfit, restored, cause = [], None, None
      try:
        misfit = self._misfit(step, abstract_state)
        if not misfit:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data_iter=grain.checkpoint.CheckpointRestore(data_iter),
              meta=ocp.args.JsonRestore()))
      except DAMAGE as e:
        cause = e
      if misfit:
        raise CheckpointError(f'Checkpoint step {step} in {self.directory} does not fit this config\'s model '
                              f'({"; ".join(misfit[:5])}). Resume with the config that wrote it, or use another '
                              '--workdir.')
      if _everywhere(cause is None):
        return restored['state'], restored['meta'], step
      self._move_aside(step, cause)
    return None

  def _misfit(self, step: int, abstract_state) -> list[str]:
    """How the stored model variables and the data-iterator files differ from what this run expects."""
    stored = _stored_tree(self.directory / str(step) / 'state')
    problems = []
    for collection in ('params', 'batch_stats'):
      have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(stored.get(collection, {}))).items()}
      want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_state[collection]).items()}
      for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
          problems.append(f'{collection}/{"/".join(key)}: stored {have.get(key)}, model {want.get(key)}')
    iter_dir = self.directory / str(step) / 'data_iter'
    mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not (iter_dir / mine).exists():
      others = sorted(p.name for p in iter_dir.iterdir() if p.name.startswith('process_')) if iter_dir.exists() else []
      if others:
        problems.append(f'its data iterator was saved by a job of {others[0].split("-of-")[-1][:-5]} processes '
                        f'({", ".join(others[:4])}), this one has {jax.process_count()}')
    return problems

  def _move_aside(self, step: int, cause: Optional[BaseException]):
    target = self.workdir / DAMAGED_DIR / f'{step}-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}'
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      paths.move_tree(self.directory / str(step), target)
      logging.warning('Checkpoint step %d cannot be restored (%s); moved it to %s and falling back to an earlier '
                      'one.', step, _one_line(cause) if cause else 'on another process', target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved aside checkpoint {step}')
    self.manager.reload()

  # -------------------------------------------------------------------------------------------------
  # Saving.

  def save(self, step: int, state: dict, data_iter, meta: dict, metrics: Optional[dict] = None):
    """Queues a save of `step` (async unless configured otherwise); a failure of the previous one raises.

    A step saved without eval `metrics` ranks last for keep-best (only keep-latest keeps it).
    """
    self.wait()  # Orbax would wait for the previous save anyway; this names its step if it failed.
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave(meta)), metrics=dict(metrics or {}), force=True)
    except Exception as e:
      raise self._failure(step, e) from e
    self._pending = step

  def check(self):
    """Raises `CheckpointError` if a background save failed (cheap: the trainer calls it every step)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:
      raise self._failure(self._pending, e) from e

  def wait(self):
    """Waits for the last save; raises `CheckpointError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._failure(self._pending, e) from e
    self.check()
    self._pending = None

  def close(self):
    """Stops background work without raising (the run already ended, or is ending with an error)."""
    try:
      self.manager.close()
    except Exception as e:  # Already reported by wait()/check(), or superseded by the error in flight.
      logging.warning('Closing the checkpoint manager: %s', _one_line(e))

  def _failure(self, step, error: BaseException) -> CheckpointError:
    earlier = [s for s in self.manager.all_steps() if step is None or s < step]
    kept = (f'the last complete checkpoint, step {max(earlier)}, is intact' if earlier else
            'there is no earlier checkpoint')
    return CheckpointError(f'Saving checkpoint step {step} to {self.directory / str(step)} failed '
                           f'({_one_line(error)}); training stopped, {kept}.')


# ---------------------------------------------------------------------------------------------------
# Model variables for fine-tuning, evaluation and analysis.

def _stored_tree(state_dir) -> dict:
  """The array metadata (shape, dtype) tree of a checkpoint's 'state' item, read without restoring."""
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(state_dir).item_metadata
  if stored is None:
    raise ValueError(f'{state_dir}: the array metadata cannot be read.')
  return stored.tree


CHECKPOINT_CHOICES = 'latest, best or a step number'


def has_training_checkpoints(workdir) -> bool:
  """Whether `<workdir>/checkpoints` holds at least one step directory."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _step_dir(path, which: str, metric: str) -> tuple[Any, Optional[int]]:
  """(step dir, step) of a workdir, its checkpoints/ dir or one step dir: `which` is 'latest', 'best'
  (the highest `metric` among the steps saved with an evaluation) or a step number."""
  if which not in ('latest', 'best') and not which.isdigit():
    raise CheckpointError(f'checkpoint {which!r}: expected {CHECKPOINT_CHOICES}.')
  if (path / 'state').is_dir():
    if which != 'latest' and which != path.name:
      raise CheckpointError(f'{path} is the checkpoint of one step; checkpoint {which!r} needs its workdir.')
    return path, int(path.name) if path.name.isdigit() else None
  ckpts = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  best = dict(best_fn=lambda metrics: metrics.get(metric, -np.inf), best_mode='max') if which == 'best' else {}
  manager = ocp.CheckpointManager(ckpts, options=ocp.CheckpointManagerOptions(read_only=True, **best))
  try:
    steps = manager.all_steps()
    step = {'latest': manager.latest_step, 'best': manager.best_step}.get(which, lambda: int(which))()
  finally:
    manager.close()
  if not steps:
    raise CheckpointError(f'{path}: no complete training checkpoint (expected a workdir, its checkpoints/ '
                          'directory, a step directory, or a weights checkpoint written by convert).')
  if step is None:
    raise CheckpointError(f'{path}: no checkpoint has an evaluation with {metric!r} (config.metric) to be the best.')
  if step not in steps:
    raise CheckpointError(f'{path} has no checkpoint of step {step}; it has steps {sorted(steps)}.')
  return ckpts / str(step), step


def _model_name(step_dir) -> Optional[str]:
  """The model name the trainer stored with a step (its 'meta' item), None when it is not there."""
  meta = step_dir / 'meta' / 'metadata'
  try:
    return json.loads(meta.read_text()).get('model_name')
  except (OSError, ValueError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class StoredModel:
  """Model variables read from a checkpoint, with what the checkpoint says about them."""
  variables: dict  # {'params', 'batch_stats'} as host arrays
  model_name: Optional[str]  # the registered model that wrote them, when recorded
  step: Optional[int]  # the training step; None for a weights checkpoint
  path: Any  # the step directory or weights checkpoint read


def load_model(path, which: str = 'latest', metric: str = 'top1') -> StoredModel:
  """The model variables of a weights checkpoint or a training checkpoint (`which`: latest, best by
  `metric`, or a step number) from a workdir, its checkpoints/ dir or a step dir."""
  path = paths.path(path)
  if not path.exists():
    raise CheckpointError(f'{path} does not exist.')
  if weights.is_weights_checkpoint(path):
    if which != 'latest':
      raise CheckpointError(f'{path} is a weights checkpoint (one set of weights): checkpoint {which!r} applies '
                            'to training checkpoints only.')
    variables, meta = weights.load_weights(path)
    return StoredModel(variables, meta['model_name'], None, path)
  step_dir, step = _step_dir(path, which, metric)
  try:
    stored = _stored_tree(step_dir / 'state')
    with ocp.StandardCheckpointer() as checkpointer:
      # Whole arrays on one local device, whatever mesh and how many processes wrote them.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                                      stored)
      restored = checkpointer.restore(step_dir / 'state', target)
  except Exception as e:
    raise CheckpointError(f'{step_dir}: cannot read the model variables ({_one_line(e)}).') from e
  variables = {k: jax.tree_util.tree_map(np.asarray, restored[k]) for k in ('params', 'batch_stats')}
  return StoredModel(variables, _model_name(step_dir), step, step_dir)


def load_variables(path) -> dict:
  """{'params', 'batch_stats'} as host arrays from a weights checkpoint or any training checkpoint path."""
  return load_model(path).variables
