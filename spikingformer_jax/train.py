"""Training and evaluation of any registered model from a config, on one CPU or a multi-host pod.

The functional core is `make_train_step` / `make_eval_step`: pure functions of (state, batch, rng)
compiled once with `jax.jit` and explicit in/out shardings over a ('data', 'fsdp') mesh. The host
loop around them (`train_and_evaluate`) owns data, checkpoints, logging and preemption.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from spikingformer_jax import (checkpoint, configs, cpu_runtime, mixup, optim, paths, run_lock, sharding,
                              tasks)
from spikingformer_jax.metric_writer import MetricWriter

State = dict  # {'step', 'params', 'batch_stats', 'opt_state'}


# ---------------------------------------------------------------------------------------------------
# The pure steps.

@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the compiled steps close over (static for jit)."""
  model: Any
  tx: optax.GradientTransformation
  config: Any
  steps_per_epoch: int
  schedule: Callable  # the LR at a (fractional) step count
  budget_steps: int = 0  # a run on a time budget: the steps its schedule spans (see make_train_step)


LOSS_HPARAMS = ('label_smoothing', 'mixup_alpha', 'cutmix_alpha')


def make_train_step(ctx: StepContext):
  """`train_step(state, batch, rng, hparams=None)`: one optimizer step.

  `hparams` may give any of LOSS_HPARAMS as (traced) values in place of the config's: vmapped trials
  (spikingformer_jax.trials) pass one value per trial.
  A run on a time budget (`ctx.budget_steps`) passes 'budget_progress', the fraction of the budget spent:
  the schedule is read at max(step, budget_progress * budget_steps), so it runs to its end by whichever
  comes first, the clock or the steps (a constant-rate stop mid-schedule would leave the LR high).
  """
  config, model = ctx.config, ctx.model
  task = tasks.get_task(config)
  accum = int(config.grad_accum_steps)
  mix_cfg = config.mixup

  def microbatch_grads(params, batch_stats, mb, rng, epoch, hp):
    inputs = task.model_inputs(mb)
    soft_targets = None
    if task.soft_targets:
      if task.mixes_inputs:
        enabled = True if mix_cfg.off_epoch < 0 else epoch < mix_cfg.off_epoch
        image, soft_targets = mixup.mix_batch(
            rng, mb['image'], mb['label'], num_classes=config.model.num_classes,
            smoothing=hp['label_smoothing'], mixup_alpha=hp['mixup_alpha'], cutmix_alpha=hp['cutmix_alpha'],
            prob=mix_cfg.prob, switch_prob=mix_cfg.switch_prob, enabled=enabled,
            groups=mixup.device_groups(mb['image'].shape[0], sharding.batch_shards(mb['image'].shape[0])))
        inputs = (image,)
      else:
        soft_targets = mixup.smooth_one_hot(mb['label'], config.model.num_classes, hp['label_smoothing'])

    def loss_fn(p):
      outputs, new_vars = model.apply({'params': p, 'batch_stats': batch_stats}, *inputs, train=True,
                                      mutable=['batch_stats'])
      loss, correct = task.loss(outputs, mb, soft_targets)
      return loss, (new_vars['batch_stats'], correct)

    (loss, (new_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, new_stats, loss, jnp.mean(correct)

  def train_step(state: State, batch: dict, rng: jax.Array, hparams: dict | None = None):
    hp = {'label_smoothing': config.label_smoothing, 'mixup_alpha': mix_cfg.mixup_alpha,
          'cutmix_alpha': mix_cfg.cutmix_alpha, **(hparams or {})}
    epoch = state['step'] // ctx.steps_per_epoch
    if accum == 1:
      grads, new_stats, loss, acc = microbatch_grads(state['params'], state['batch_stats'], batch, rng, epoch, hp)
    else:  # Gradient accumulation: a scan over microbatches, BatchNorm statistics threaded through.
      micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        grad_sum, stats = carry
        mb, i = xs
        g, stats, loss, acc = microbatch_grads(state['params'], stats, mb, jax.random.fold_in(rng, i), epoch, hp)
        return (jax.tree_util.tree_map(jnp.add, grad_sum, g), stats), (loss, acc)

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state['params'])
      (grad_sum, new_stats), (losses, accs) = jax.lax.scan(body, (zeros, state['batch_stats']),
                                                           (micro, jnp.arange(accum)))
      grads = jax.tree_util.tree_map(lambda g: g / accum, grad_sum)
      loss, acc = losses.mean(), accs.mean()
    updates, opt_state = ctx.tx.update(grads, state['opt_state'], state['params'])
    if ctx.budget_steps:  # ctx.tx runs at a unit rate (optim.unit_rate); AdamW's LR is its last factor.
      budget_lr = ctx.schedule(jnp.maximum(state['step'], hp['budget_progress'] * ctx.budget_steps))
      updates = jax.tree_util.tree_map(lambda u: (budget_lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state['params'], updates)
    new_state = {'step': state['step'] + 1, 'params': params, 'batch_stats': new_stats, 'opt_state': opt_state}
    step_metrics = {'loss': loss, 'train_accuracy': acc, 'grad_norm': optax.global_norm(grads),
                    'lr': budget_lr if ctx.budget_steps else ctx.schedule(state['step'])}
    return new_state, step_metrics

  return train_step


def make_eval_step(ctx: StepContext):
  task = tasks.get_task(ctx.config)

  def eval_step(state: State, batch: dict):
    outputs = ctx.model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                              *task.model_inputs(batch), train=False)
    return task.eval_output(outputs)
  return eval_step


# ---------------------------------------------------------------------------------------------------
# State creation, sharding and fine-tuning.

def merge_pretrained(fresh: dict, pretrained: dict, addable: Sequence[str] = ()) -> tuple[dict, list[str]]:
  """Takes every pretrained variable that fits; heads (modules named '*head*') may be re-initialised.

  `addable` names top-level modules that fine-tuning may add to a pretrained backbone (e.g. the text
  model's `match_embed`): restored when the checkpoint has them, freshly initialised when it has not.
  Returns (variables, notes). Anything else missing, unexpected or mis-shaped is one error listing all.
  """
  is_head = lambda path: any('head' in part for part in path[1:2])
  new, old = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(pretrained)
  merged, notes, problems = {}, [], []
  for path, value in new.items():
    name = '/'.join(path)
    if path in old and tuple(old[path].shape) == tuple(value.shape):
      merged[path] = jnp.asarray(old[path], value.dtype)
    elif is_head(path) or (path not in old and path[1] in addable):
      merged[path] = value
      notes.append(f'initialised {name} afresh ' + ('(absent in checkpoint)' if path not in old else
                                                   f'(checkpoint {tuple(old[path].shape)} vs {tuple(value.shape)})'))
    elif path not in old:
      problems.append(f'missing in checkpoint: {name} {tuple(value.shape)}')
    else:
      problems.append(f'shape mismatch: {name} checkpoint {tuple(old[path].shape)} vs model {tuple(value.shape)}')
  for path in sorted(set(old) - set(new)):
    if is_head(path):
      notes.append(f'dropped checkpoint head variable {"/".join(path)}')
    else:
      problems.append(f'unexpected in checkpoint: {"/".join(path)}')
  if problems:
    raise configs.ConfigError('the checkpoint does not fit the model:\n  ' + '\n  '.join(problems))
  return traverse_util.unflatten_dict(merged), notes


def init_state(ctx: StepContext, example: tuple, rng) -> State:
  """A fresh training state (pure: jit or vmap it over `rng`)."""
  variables = ctx.model.init(rng, *example, train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': batch_stats,
          'opt_state': ctx.tx.init(params)}


def abstract_state(ctx: StepContext, mesh, example: tuple) -> tuple[State, Any]:
  """The state's shapes and dtypes with their shardings on `mesh` (nothing allocated), and the shardings."""
  abstract = jax.eval_shape(functools.partial(init_state, ctx, example), jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(abstract, mesh)
  with_shardings = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          abstract, shardings)
  return with_shardings, shardings


def jit_train_step(ctx: StepContext, state_shardings, mesh):
  """`make_train_step` compiled for `mesh`: state sharded as given (and donated), batch split over devices.

  A run on a time budget calls it with a fourth argument, `budget_inputs(progress)`.
  """
  repl = sharding.replicated(mesh)
  in_shardings = (state_shardings, sharding.batch_sharding(mesh), repl)
  if ctx.budget_steps:
    in_shardings += (repl,)
  return jax.jit(sharding.traced_in(mesh, make_train_step(ctx)), in_shardings=in_shardings,
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


def budget_inputs(progress) -> dict:
  """The train step's `hparams` of a run on a time budget: the fraction of it spent (one value on every host)."""
  return {'budget_progress': np.float32(progress)}


def create_state(ctx: StepContext, mesh, example: tuple, rng, init_from: str = ''):
  """The initial state, created directly with its shardings (nothing materialised on one device first)."""
  _, shardings = abstract_state(ctx, mesh, example)
  # The seed is an input, not a constant: one compiled init for every seed (a host value: fine on any process).
  state = jax.jit(functools.partial(init_state, ctx, example), out_shardings=shardings)(np.asarray(rng))
  if init_from:
    stored = checkpoint.load_model(init_from)
    try:
      state = load_pretrained(ctx, state, shardings, stored.variables)
    except configs.ConfigError as e:
      raise misfit_error(stored, ctx.config, e) from None
  return state, shardings


def misfit_error(stored: checkpoint.StoredModel, config, error: configs.ConfigError) -> configs.ConfigError:
  """`error` (merge_pretrained's list of misfits) led by the two models' names when they differ."""
  models_differ = stored.model_name and stored.model_name != config.model.name
  lead = (f'{stored.path} holds a {stored.model_name!r} model but config.model.name is {config.model.name!r}'
          if models_differ else f'{stored.path} does not fit config.model.name = {config.model.name!r}')
  return configs.ConfigError(f'{lead}: {error}')


def load_pretrained(ctx: StepContext, state: State, shardings, pretrained: dict, tx_init=None) -> State:
  """`state` with every pretrained variable that fits (merge_pretrained) and a fresh optimizer state.

  `tx_init` (default ctx.tx.init) builds the optimizer state from the parameters (vmapped for trials).
  """
  fresh = {'params': state['params'], 'batch_stats': state['batch_stats']}
  merged, notes = merge_pretrained(fresh, pretrained, getattr(ctx.model, 'added_in_finetuning', ()))
  for note in notes:
    logging.info('init_from: %s', note)
  merged = jax.device_put(merged, {'params': shardings['params'], 'batch_stats': shardings['batch_stats']})
  state = dict(state, params=merged['params'], batch_stats=merged['batch_stats'])
  state['opt_state'] = jax.jit(tx_init or ctx.tx.init, out_shardings=shardings['opt_state'])(state['params'])
  return state


# ---------------------------------------------------------------------------------------------------
# Evaluation.

def evaluate(eval_fn, state, loader, mesh, config, info) -> dict:
  del info
  return eval_metrics(config, *collect_outputs(eval_fn, state, loader, mesh, config))


def collect_outputs(eval_fn, state, loader, mesh, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(outputs, labels, mask) of the whole split, gathered from every process; outputs stack on axis 0."""
  task = tasks.get_task(config)
  outputs, labels, masks = [], [], []
  for batch in loader:
    gbatch = sharding.global_batch(batch, mesh)
    out = eval_fn(state, gbatch)
    outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float32))
    labels.append(np.asarray(multihost_utils.process_allgather(gbatch['label'], tiled=True)))
    masks.append(np.asarray(multihost_utils.process_allgather(task.eval_mask(gbatch), tiled=True)))
  return np.concatenate(outputs), np.concatenate(labels), np.concatenate(masks)


def eval_metrics(config, out, lab, mask) -> dict:
  """The task's metrics of gathered eval outputs (mask: 1 for real examples, 0 for padding)."""
  return tasks.get_task(config).metrics(out, lab, mask)


# ---------------------------------------------------------------------------------------------------
# The host loop.

CONFIG_FILE = 'config.json'  # the run's config, at the top of the workdir
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: saved after a SIGTERM; rerunning the command resumes.


class Preemption:
  """Preemption (SIGTERM, what TPU maintenance sends) that every process of a job agrees on.

  One process: SIGTERM sets a flag; the loop saves a checkpoint after the current step and stops.
  Several processes: a flag per process would stop one at step N while another runs on to N+1 and
  waits forever in a collective. jax.distributed's preemption service catches SIGTERM on whichever
  process receives it, tells the others, and `reached_preemption_sync_point` turns True on every
  process at the same step. Its handler replaces ours when the job is joined (`joined_job`); a
  SIGTERM that came before is delivered to it again then.
  """

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: rely on jax's multi-process preemption service only.
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.requested = True

  def joined_job(self):
    if jax.process_count() > 1 and self.requested:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (every process gets the same answer; call it every step)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress(total, initial, enabled, timed: bool):
  """A step counter; a run on a time budget (`timed`) has no step total to show or time to estimate."""
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # noqa: PLC0415
  return tqdm(total=None if timed else total, initial=initial, unit='step', dynamic_ncols=True)


def schedule_epochs(config, steps_per_epoch: int) -> float:
  """The cosine's length in epochs: num_epochs, or the whole run when total_steps sets its length."""
  if config.total_steps > 0:
    return config.total_steps / steps_per_epoch
  return config.num_epochs


def plan(config, info) -> tuple[int, int]:
  """(steps per epoch, total steps); the schedule's cooldown epochs run after num_epochs."""
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise configs.ConfigError(f'config.batch_size = {config.batch_size} is larger than the training set '
                              f'({info.num_train} examples).')
  if config.total_steps > 0:
    return steps_per_epoch, int(config.total_steps)
  return steps_per_epoch, steps_per_epoch * (config.num_epochs + config.optim.cooldown_epochs)


def make_context(config, info) -> tuple[StepContext, tuple]:
  """The model, optimizer and schedule of `config` for dataset `info`, and an example input for init."""
  steps_per_epoch, total_steps = plan(config, info)
  task = tasks.get_task(config)
  model = task.build_model(info)
  schedule = optim.make_schedule(config.optim, schedule_epochs(config, steps_per_epoch), steps_per_epoch)
  budget_steps = total_steps if config.get('time_budget_minutes', 0.0) > 0 else 0
  example = task.example_inputs(info)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example, train=False)['params'])
  tx = optim.make_optimizer(config.optim, optim.unit_rate if budget_steps else schedule, abstract_params,
                            config.freeze)
  return StepContext(model, tx, config, steps_per_epoch, schedule, budget_steps), example


def train_and_evaluate(config, workdir, *, stop_after_steps: int | None = None, devices=None,
                       clock: Callable[[], float] = time.perf_counter) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns the final summary.

  `workdir` is a local path or a gs:// (any etils.epath) URL. The summary's 'preempted' is True
  when a SIGTERM stopped the run (after saving); rerunning the same command resumes it.
  `stop_after_steps` ends this invocation early the same way (tests), `devices` restricts the mesh
  to a subset of the local devices (default: all).
  `config.time_budget_minutes` > 0 ends training once that much wall time has been spent (start-up and
  compilation included, from this call; a resumed run goes on with what its checkpoint left of the budget),
  then evaluates and saves: a run on a fixed time budget, its LR schedule spread over the budget. `clock`
  (seconds) measures the budget.
  """
  budget_s = 60.0 * config.get('time_budget_minutes', 0.0)
  budget = TimeBudget(budget_s, clock, clock()) if budget_s > 0 else None
  preemption = Preemption()  # First thing: a SIGTERM during start-up must not kill the run unsaved.
  try:
    return _train_and_evaluate(config, workdir, preemption, stop_after_steps, devices, budget)
  finally:
    preemption.restore()


def _resume(config, ctx, mesh, example, ckpts, train_loader):
  """(state, shardings, train iterator, checkpoint meta): the newest checkpoint that restores, else a fresh
  start (or init_from) with meta {}."""
  rng = jax.random.PRNGKey(config.seed)
  has_checkpoints = ckpts.latest_step() is not None
  state, shardings = create_state(ctx, mesh, example, rng, '' if has_checkpoints else config.init_from)
  train_iter = iter(train_loader)
  if not has_checkpoints:
    return state, shardings, train_iter, {}
  restored = ckpts.restore_latest(abstract_state(ctx, mesh, example)[0], train_iter)
  if restored is not None:
    state, meta, step = restored
    logging.info('Resumed from step %d in %s', step, ckpts.directory)
    return state, shardings, train_iter, meta
  logging.warning('No checkpoint in %s restores (all moved aside): training from the start.', ckpts.directory)
  if config.init_from:
    state, shardings = create_state(ctx, mesh, example, rng, config.init_from)
  return state, shardings, iter(train_loader), {}


BUDGET_SPENT_KEY = 'time_budget_spent_s'  # checkpoint meta: wall time a run on a time budget has spent


@dataclasses.dataclass(frozen=True)
class TimeBudget:
  """A run's wall-time budget (`config.time_budget_minutes`), counted on `clock` from `started`, plus what the
  invocations before this one spent (`spent_before`, from the checkpoint it resumed)."""
  seconds: float
  clock: Callable[[], float]
  started: float
  spent_before: float = 0.0

  def spent(self) -> float:
    return self.spent_before + self.clock() - self.started

  def progress(self, step_metrics=None) -> float:
    """The fraction spent, as every process of the job sees it (the largest; one collective).

    `step_metrics`: the step just dispatched, waited for first (the clock must see executed steps, not
    queued ones).
    """
    if step_metrics is not None:
      jax.block_until_ready(step_metrics['loss'])
    progress = self.spent() / self.seconds
    if jax.process_count() > 1:
      progress = float(np.max(multihost_utils.process_allgather(np.float32(progress))))
    return progress


def _train_and_evaluate(config, workdir, preemption, stop_after_steps, devices, budget: TimeBudget | None) -> dict:
  configs.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)
  preemption.joined_job()
  mesh = sharding.make_mesh(config.mesh, devices)
  n_dev = mesh.devices.size
  for field, value in (('batch_size', config.batch_size // config.grad_accum_steps),
                       ('eval_batch_size', config.eval_batch_size)):
    if value % n_dev:
      raise configs.ConfigError(f'config.{field} (per microbatch: {value}) must be divisible by the '
                                f'{n_dev} devices of the mesh.')
  pidx, pcount = jax.process_index(), jax.process_count()
  dm = tasks.get_task(config).data_module
  info = dm.dataset_info(config.data)
  steps_per_epoch, total_steps = plan(config, info)
  ctx, example = make_context(config, info)
  if config.model.spike_kernels and n_dev > 1 and mesh.devices.flat[0].platform == 'cpu':
    raise configs.ConfigError(
        f'config.model.spike_kernels is for training on one CPU device, but the mesh has {n_dev}: '
        'XLA cannot split the kernels\' custom calls and would run every product whole on each device. Set '
        'config.mesh.data = 1 (and mesh.fsdp = 1), or drop spike_kernels.')
  train_loader = dm.make_loader(config.data, config.data.train_split, batch_size=config.batch_size, train=True,
                                seed=config.seed, process_index=pidx, process_count=pcount)

  def eval_loader():
    return dm.make_loader(config.data, config.data.eval_split, batch_size=config.eval_batch_size, train=False,
                          seed=config.seed, process_index=pidx, process_count=pcount)

  with run_lock.hold(workdir, config.run_lock_stale_after_s) as lock:  # Before anything is written.
    if pidx == 0:
      (paths.path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + '\n')
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint, config.metric)
    writer = bar = None
    try:
      state, state_shardings, train_iter, resumed_meta = _resume(config, ctx, mesh, example, ckpts, train_loader)
      start_step = int(jax.device_get(state['step']))
      if budget:
        budget = dataclasses.replace(budget, spent_before=float(resumed_meta.get(BUDGET_SPENT_KEY, 0.0)))
      progress = budget.progress() if budget else 0.0
      bsh = sharding.batch_sharding(mesh)
      train_fn = jit_train_step(ctx, state_shardings, mesh)
      eval_fn = jax.jit(sharding.traced_in(mesh, make_eval_step(ctx)), in_shardings=(state_shardings, bsh),
                        out_shardings=bsh)
      meta = {'model_name': config.model.name, 'config': config.to_json_best_effort()}
      writer = MetricWriter(workdir, start_step)  # Drops metrics logged after start_step by an interrupted run.
      bar = _progress(total_steps, start_step, config.progress_bar, bool(budget))
      base_rng = jax.random.PRNGKey(config.seed + 1)
      best = {}
      last_eval: dict = {}
      images_seen, t0 = 0, time.perf_counter()
      examples_since_eval, eval_t0 = 0, t0
      step, preempted, budget_spent = start_step, False, progress >= 1
      end_step = total_steps if stop_after_steps is None else min(total_steps, start_step + stop_after_steps)
      while step < end_step and not budget_spent:
        batch = sharding.global_batch(next(train_iter), mesh)
        budget_args = (budget_inputs(progress),) if budget else ()
        state, step_metrics = train_fn(state, batch, jax.random.fold_in(base_rng, step), *budget_args)
        step += 1
        ckpts.check()  # A failed background save stops the run here, not many steps later.
        images_seen += config.batch_size
        if step == start_step + 1:  # train_fn compiled in that call; the compiler's heap is free now.
          cpu_runtime.release_freed_memory()
          jax.block_until_ready(step_metrics['loss'])  # The evaluation lines' throughput leaves compilation out.
          examples_since_eval, eval_t0 = 0, time.perf_counter()
        else:
          examples_since_eval += config.batch_size
        if bar is not None:
          bar.update(1)
        if step % config.log_every_steps == 0 or step == end_step:
          scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          if not all(math.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f'Non-finite training metrics at step {step}: {scalars}. No checkpoint was '
                                     'written for this state; lower optim.lr or enable optim.grad_clip.')
          elapsed = time.perf_counter() - t0
          scalars['examples_per_sec'] = images_seen / elapsed
          scalars['step_time_ms'] = 1000 * elapsed / max(1, config.log_every_steps if step % config.log_every_steps
                                                         == 0 else step - start_step)
          images_seen, t0 = 0, time.perf_counter()
          writer.write(step, 'train', scalars)
          if bar is not None:
            bar.set_postfix(loss=f'{scalars["loss"]:.3f}', lr=f'{scalars["lr"]:.2e}')
        epoch_end = step % steps_per_epoch == 0
        if budget:
          progress = budget.progress(step_metrics)
        out_of_time = progress >= 1
        eval_now = ((epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or step == total_steps
                    or out_of_time)
        metrics_for_ckpt = None
        if eval_now:
          last_eval = evaluate(eval_fn, state, eval_loader(), mesh, config, info)
          cpu_runtime.release_freed_memory()  # eval_fn compiled in the first evaluation; later calls free little
          writer.write(step, 'eval', last_eval)
          if config.metric in last_eval and last_eval[config.metric] >= best.get(config.metric, -np.inf):
            best = dict(last_eval, step=step)
          metrics_for_ckpt = {k: float(v) for k, v in last_eval.items()} or None
          if pidx == 0:
            throughput = examples_since_eval / (time.perf_counter() - eval_t0) if examples_since_eval else None
            line = format_eval_line(config, math.ceil(step / steps_per_epoch), step, last_eval, throughput)
            if bar is not None:
              bar.write(line)
            else:
              print(line, flush=True)
          t0 = eval_t0 = time.perf_counter()
          examples_since_eval = 0
        preempted = preemption.reached(step)
        if step % config.checkpoint.every_steps == 0 or eval_now or preempted or step == end_step:
          writer.flush()  # What the checkpoint covers is stored before it.
          if lock is not None:
            lock.refresh()
          budget_meta = {BUDGET_SPENT_KEY: budget.spent()} if budget else {}
          ckpts.save(step, state, train_iter, dict(meta, eval=last_eval, **budget_meta), metrics_for_ckpt)
        if preempted:
          logging.warning('Preempted: saved step %d; rerun the same command to resume.', step)
          break
        if out_of_time:
          logging.info('Time budget (config.time_budget_minutes) spent at step %d.', step)
          budget_spent = True
          break
      ckpts.wait()  # The last save must be complete (or its failure reported) before the summary.
    finally:
      ckpts.close()
      if writer is not None:
        writer.close()
      if bar is not None:
        bar.close()
  return {'step': step, 'total_steps': total_steps, 'final': last_eval, 'best': best,
          'completed': step >= total_steps or budget_spent, 'preempted': preempted and step < total_steps}


def format_eval_line(config, epoch: int, step: int, result: dict, examples_per_sec: float | None) -> str:
  """`epoch 3 step 135: top1 0.9889 loss 0.041 (1,234 img/s)`: the epoch the step ends or falls in (from 1),
  config.metric first, 4 significant digits, and the training throughput since the last evaluation (None: no
  step to time, e.g. only the compiling one)."""
  names = [config.metric] + [k for k in ('loss',) if k != config.metric]
  values = ' '.join(f'{k} {result[k]:.4g}' for k in names if k in result)
  if examples_per_sec is None:
    return f'epoch {epoch} step {step}: {values}'
  unit = 'sequences/s' if tasks.is_text(config) else 'img/s'
  return f'epoch {epoch} step {step}: {values} ({examples_per_sec:,.0f} {unit})'


def format_summary(summary: dict) -> str:
  step = summary['step']
  rows = [('step', '— (weights checkpoint)' if step is None else f'{step} / {summary["total_steps"]}')]
  if 'checkpoint' in summary:
    rows.append(('checkpoint', summary['checkpoint']))
  for prefix in ('final', 'best'):
    for k, v in sorted(summary.get(prefix, {}).items()):
      rows.append((f'{prefix} {k}', f'{v:.4f}' if isinstance(v, float) else str(v)))
  width = max(len(r[0]) for r in rows)
  return '\n'.join(f'| {k.ljust(width)} | {v} |' for k, v in rows)
