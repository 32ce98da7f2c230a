"""Many trials in one compiled step: configs that differ only in optimizer hyperparameters and seeds.

K trial configs that agree on everything but TRIAL_HPARAMS (learning rate and its schedule, weight
decay, label smoothing, mixup/cutmix alpha, seed) train together: `train.make_train_step` is vmapped
over a stacked state (parameters, BatchNorm statistics, optimizer state, each with a leading trial
axis), one batch per trial, and the hyperparameters are inputs of that one compiled step. The
optimizer is `optim.make_optimizer` wrapped in `optax.inject_hyperparams`, so the learning rate
(each trial's own schedule) and weight decay come from the trial's values; its inner state is the
plain optimizer's, so the stacked state holds exactly K ordinary training states.

Each trial is its own run: it gets the initial state, data order and step keys of its seed, and
writes to its workdir what `spikingformer_jax.main` writes there (Orbax checkpoints in checkpoint.py's
layout, metrics.jsonl, TensorBoard files, summary.json). So a trial resumes, fine-tunes
(`--config.init_from=<workdir>`) and evaluates (`--mode=eval`) like any run, and equals its separate
run up to float rounding: vmapped products sum in another order, and over many steps those
differences grow as any change of summation order makes them grow (Adam's small eps, spike
thresholds). On the CPU, XLA runs the trials' convolutions as one grouped convolution, slower than
the K convolutions one by one (BENCHMARKS.md): there a group saves processes and compilations, not
arithmetic.

  python -m spikingformer_jax.trials --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/digits_sweep \
      --trials=optim.lr=0.001_optim.weight_decay=0.01_seed=0,optim.lr=0.001_optim.weight_decay=0.01_seed=1

runs the named trials of a sweep as one group (what `spikingformer_jax.sweep --vmap=K` starts).
"""
from __future__ import annotations

from spikingformer_jax import cpu_runtime

if __name__ == '__main__':
  cpu_runtime.reuse_freed_memory_on_cpu()  # Before any import starts a thread (see the function).

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402
from etils import epath  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from spikingformer_jax import checkpoint, compile_cache, configs, optim, run_lock, sharding, tasks, train  # noqa: E402
from spikingformer_jax.metric_writer import MetricWriter  # noqa: E402

# Config key -> name of the per-trial input. Every other config field must be equal across a group.
TRIAL_HPARAMS = {
    'optim.lr': 'lr', 'optim.min_lr': 'min_lr', 'optim.warmup_lr': 'warmup_lr',
    'optim.warmup_epochs': 'warmup_epochs', 'optim.weight_decay': 'weight_decay',
    'label_smoothing': 'label_smoothing', 'mixup.mixup_alpha': 'mixup_alpha', 'mixup.cutmix_alpha': 'cutmix_alpha',
}
TRIAL_KEYS = frozenset(TRIAL_HPARAMS) | {'seed'}
FAILED_TRIALS = 3  # exit status of main() when some trials failed


class TrialsError(ValueError):
  """The configs cannot train as one vmapped group; the message names the field."""


def flat_config(config) -> dict:
  """{dotted key: value} of every field."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[prefix + key] = value
  walk(config.to_dict(), '')
  return flat


def differing_keys(trial_configs: Sequence) -> list[str]:
  """The dotted config keys whose values are not the same in every config."""
  flats = [flat_config(c) for c in trial_configs]
  keys = set().union(*flats)
  return sorted(k for k in keys if any(f.get(k) != flats[0].get(k) for f in flats[1:]))


def check_group(trial_configs: Sequence, names: Sequence[str]):
  """Raises TrialsError unless the configs differ only in TRIAL_KEYS."""
  for key in differing_keys(trial_configs):
    if key not in TRIAL_KEYS:
      values = ', '.join(f'{n}: {flat_config(c).get(key)!r}' for n, c in zip(names, trial_configs))
      raise TrialsError(f'trials {list(names)} differ in {key!r} ({values}); a vmapped group may differ only in '
                        f'{sorted(TRIAL_KEYS)}. Run them as separate trials (no --vmap).')


def hyperparams(trial_configs: Sequence) -> dict[str, np.ndarray]:
  """{input name: float32 [K]} of every trial's TRIAL_HPARAMS values."""
  flats = [flat_config(c) for c in trial_configs]
  return {name: np.asarray([f[key] for f in flats], np.float32) for key, name in TRIAL_HPARAMS.items()}


# ---------------------------------------------------------------------------------------------------
# The pure steps.

def make_optimizer(config, abstract_params) -> optax.GradientTransformation:
  """optim.make_optimizer with the learning rate and weight decay as inputs (optax.inject_hyperparams)."""
  def factory(learning_rate, weight_decay):
    return optim.make_optimizer(config.optim, lambda _: learning_rate, abstract_params, config.freeze, weight_decay)
  return optax.inject_hyperparams(factory)(learning_rate=config.optim.lr, weight_decay=config.optim.weight_decay)


def trial_schedule(config, hp: dict, steps_per_epoch: int) -> Callable:
  """The LR schedule of one trial: optim.make_schedule over the trial's (traced) values."""
  values = {**config.optim.to_dict(), **{k: hp[k] for k in ('lr', 'min_lr', 'warmup_lr', 'warmup_epochs')}}
  return optim.make_schedule(types.SimpleNamespace(**values), train.schedule_epochs(config, steps_per_epoch),
                             steps_per_epoch)


def make_trials_step(ctx: train.StepContext, batch_axis):
  """(states, batches, keys, hp) -> (states, metrics [K]): train.make_train_step vmapped over trials.

  `ctx.tx` is `make_optimizer`'s; the states hold its inner (the plain optimizer's) state. `keys` are
  the trials' `PRNGKey(seed + 1)`, folded with the step as in train_and_evaluate. `batch_axis` is 0
  for one batch per trial, None for one batch shared by all (trials of a single seed).
  """
  train_step = train.make_train_step(ctx)

  def one(state, batch, key, hp):
    step = state['step']
    lr = trial_schedule(ctx.config, hp, ctx.steps_per_epoch)(step)
    injected = optax.InjectStatefulHyperparamsState(
        count=step, hyperparams={'learning_rate': lr, 'weight_decay': hp['weight_decay']}, hyperparams_states={},
        inner_state=state['opt_state'])
    new_state, metrics = train_step(dict(state, opt_state=injected), batch, jax.random.fold_in(key, step),
                                    {k: hp[k] for k in train.LOSS_HPARAMS})
    return dict(new_state, opt_state=new_state['opt_state'].inner_state), dict(metrics, lr=lr)

  return jax.vmap(one, in_axes=(0, batch_axis, 0, 0))


def make_trials_eval(ctx: train.StepContext):
  """(states, batch) -> outputs [B, K, ...]: the eval step of every trial on one shared batch."""
  eval_step = train.make_eval_step(ctx)
  return lambda states, batch: jnp.moveaxis(jax.vmap(eval_step, in_axes=(0, None))(states, batch), 0, 1)


def stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, index):
  return jax.tree_util.tree_map(lambda x: x[index], tree)


def init_states(ctx, mesh, example, abstract, trial_configs, managers, batches, names):
  """(stacked state, its shardings): every trial resumed from its latest checkpoint (and its data
  iterator with it), or created as its separate run creates it; `abstract` is one trial's state
  with its shardings (train.abstract_state).

  Fresh states come from the plain init, compiled once and run once per seed: vmapped, the random
  initialisers took twice as long to compile as the K runs of the plain one take in all.
  """
  init = functools.partial(train.init_state, ctx, example)
  rngs = np.stack([np.asarray(jax.random.PRNGKey(c.seed)) for c in trial_configs])
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  stack_shardings = sharding.state_shardings(jax.eval_shape(jax.vmap(init), rngs), mesh)
  stack_fn = jax.jit(stack, out_shardings=stack_shardings)
  latest = [m.latest_step() for m in managers]
  if all(step is None for step in latest):
    init_fn = jax.jit(init, out_shardings=shardings)
    state = stack_fn([init_fn(rng) for rng in rngs])
    init_from = trial_configs[0].init_from
    if init_from:
      tiled = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (len(rngs),) + x.shape),
                                     checkpoint.load_variables(init_from))
      state = train.load_pretrained(ctx, state, stack_shardings, tiled, jax.vmap(ctx.tx.init))
    return state, stack_shardings
  if len(set(latest)) > 1:
    raise TrialsError('the trials resume from different steps (' + ', '.join(f'{n}: {s}' for n, s in
                      zip(names, latest)) + '); a group trains in lockstep: run them as separate trials.')
  restored = []
  for i, ckpts in enumerate(managers):
    found = ckpts.restore_latest(abstract, batches.iterator(i))
    if found is None or found[2] != latest[i]:
      raise TrialsError(f'trial {names[i]}: its latest checkpoint (step {latest[i]}) does not restore and was moved '
                        'aside; a group trains in lockstep: rerun the sweep without --vmap to resume it alone.')
    restored.append(found[0])
    logging.info('trial %s: resumed from step %d in %s', names[i], latest[i], ckpts.directory)
  return stack_fn(restored), stack_shardings


# ---------------------------------------------------------------------------------------------------
# The host loop.

class _Batches:
  """One train loader per distinct seed; `next()` gives the stacked [K, b, ...] (or shared [b, ...]) batch."""

  def __init__(self, dm, trial_configs, process_index, process_count):
    self.seeds = sorted({c.seed for c in trial_configs})
    self.which = [self.seeds.index(c.seed) for c in trial_configs]
    config = trial_configs[0]
    self.iters = [iter(dm.make_loader(config.data, config.data.train_split, batch_size=config.batch_size,
                                      train=True, seed=seed, process_index=process_index,
                                      process_count=process_count)) for seed in self.seeds]
    self.batch_axis = None if len(self.seeds) == 1 else 0

  def __next__(self):
    batches = [next(it) for it in self.iters]
    if self.batch_axis is None:
      return batches[0]
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *(batches[i] for i in self.which))

  def iterator(self, trial: int):
    """The data iterator of `trial` (shared by the trials of its seed, which read the same batches)."""
    return self.iters[self.which[trial]]


def write_summary(workdir, summary: dict):
  """summary.json as spikingformer_jax.main writes it (the sweep's record of a finished run)."""
  epath.Path(workdir, 'summary.json').write_text(json.dumps(summary, indent=2, default=float))


def train_and_evaluate(trial_configs: Sequence, workdirs: Sequence, *, names: Sequence[str] | None = None,
                       devices=None, stop_after_steps: int | None = None,
                       should_stop: Callable[[int, int], dict] | None = None) -> list[dict]:
  """Trains the trials as one vmapped group (resuming each from its workdir); returns their summaries.

  `should_stop(step, steps_per_epoch)` is asked after every evaluation (whose metrics are written)
  for {trial name: reason} of trials to stop there (the sweep's early-stopping rule): each is
  checkpointed and leaves the group. A trial whose
  training metrics turn non-finite leaves it too, with the error in its summary; the others go on.
  """
  names = list(names or [str(epath.Path(w).name) for w in workdirs])
  if not len(trial_configs) == len(workdirs) == len(names) >= 1:
    raise TrialsError(f'{len(trial_configs)} configs, {len(workdirs)} workdirs and {len(names)} names: expected '
                      'one of each per trial.')
  for name, config in zip(names, trial_configs):
    try:
      configs.validate(config)
    except configs.ConfigError as e:
      raise TrialsError(f'trial {name}: {e}') from None
  check_group(trial_configs, names)
  if trial_configs[0].get('time_budget_minutes', 0) > 0:
    raise TrialsError('config.time_budget_minutes is not supported in a vmapped group; run these trials without '
                      '--vmap.')
  preemption = train.Preemption()  # First thing: a SIGTERM during start-up must not kill the run unsaved.
  try:
    return _train_and_evaluate(list(trial_configs), list(workdirs), names, devices, stop_after_steps,
                               should_stop or (lambda step, steps_per_epoch: {}), preemption)
  finally:
    preemption.restore()


def _train_and_evaluate(trial_configs, workdirs, names, devices, stop_after_steps, should_stop, preemption):
  config = trial_configs[0]
  sharding.maybe_initialize_distributed(config.distributed)
  preemption.joined_job()
  mesh = sharding.make_mesh(config.mesh, devices)
  if (config.batch_size // config.grad_accum_steps) % mesh.devices.size or config.eval_batch_size % mesh.devices.size:
    raise configs.ConfigError(f'config.batch_size (per microbatch) and config.eval_batch_size must be divisible by '
                              f'the {mesh.devices.size} devices of the mesh.')
  dm = tasks.get_task(config).data_module
  info = dm.dataset_info(config.data)
  ctx, example = train.make_context(config, info)

  with contextlib.ExitStack() as held:  # One run per workdir, as a separate run would hold it; before any write.
    locks = [held.enter_context(run_lock.hold(w, c.run_lock_stale_after_s)) for w, c in zip(workdirs, trial_configs)]
    managers = [checkpoint.Checkpoints(w, c.checkpoint, c.metric) for w, c in zip(workdirs, trial_configs)]
    for ckpts in managers:
      held.callback(ckpts.close)
    return _train_group(trial_configs, workdirs, names, mesh, should_stop, preemption, stop_after_steps, locks,
                        managers, ctx, example, dm, info)


def _train_group(trial_configs, workdirs, names, mesh, should_stop, preemption, stop_after_steps, locks, managers,
                 ctx, example, dm, info):
  config, K = trial_configs[0], len(trial_configs)
  pidx, pcount = jax.process_index(), jax.process_count()
  steps_per_epoch, total_steps = train.plan(config, info)
  batches = _Batches(dm, trial_configs, pidx, pcount)
  abstract, shardings = train.abstract_state(ctx, mesh, example)
  state, stack_shardings = init_states(ctx, mesh, example, abstract, trial_configs, managers, batches, names)
  trial_ctx = dataclasses.replace(ctx, tx=make_optimizer(config, abstract['params']))
  start_step = int(jax.device_get(state['step'][0]))
  take_fn = jax.jit(take, out_shardings=shardings)

  repl = sharding.replicated(mesh)
  batch_spec = sharding.batch_sharding(mesh) if batches.batch_axis is None else NamedSharding(
      mesh, P(None, sharding.BATCH_AXES))
  train_fn = jax.jit(sharding.traced_in(mesh, make_trials_step(trial_ctx, batches.batch_axis)),
                     in_shardings=(stack_shardings, batch_spec, repl, repl),
                     out_shardings=(stack_shardings, repl), donate_argnums=(0,))
  eval_fn = jax.jit(sharding.traced_in(mesh, make_trials_eval(ctx)),
                    in_shardings=(stack_shardings, sharding.batch_sharding(mesh)),
                    out_shardings=sharding.batch_sharding(mesh))
  keys = np.stack([np.asarray(jax.random.PRNGKey(c.seed + 1)) for c in trial_configs])
  hp = hyperparams(trial_configs)

  def eval_loader():
    return dm.make_loader(config.data, config.data.eval_split, batch_size=config.eval_batch_size, train=False,
                          seed=config.seed, process_index=pidx, process_count=pcount)

  writers = [MetricWriter(w, start_step) for w in workdirs]  # Drops metrics an interrupted run logged past it.
  active = set(range(K))
  errors, stopped, left_at = {}, {}, {}  # by trial index: why and at which step it left the group
  best, last_eval = [{} for _ in range(K)], [{} for _ in range(K)]
  step, stop = start_step, False
  end_step = total_steps if stop_after_steps is None else min(total_steps, start_step + stop_after_steps)
  images_seen, t0 = 0, time.perf_counter()

  def save(i, metrics_for_ckpt):
    meta = {'model_name': config.model.name, 'config': trial_configs[i].to_json_best_effort(), 'eval': last_eval[i]}
    writers[i].flush()  # What the checkpoint covers is stored before it.
    managers[i].save(step, take_fn(state, i), batches.iterator(i), meta, metrics_for_ckpt)

  try:
    while step < end_step and active:
      batch = jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(batch_spec, x), next(batches))
      state, step_metrics = train_fn(state, batch, keys, hp)
      step += 1
      for ckpts in managers:
        ckpts.check()  # A failed background save stops the group here, not many steps later.
      if step == start_step + 1:
        cpu_runtime.release_freed_memory()
      images_seen += config.batch_size
      if step % config.log_every_steps == 0 or step == end_step:
        values = {k: np.asarray(v, np.float64) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.perf_counter() - t0
        timing = {'examples_per_sec': images_seen / elapsed, 'step_time_ms': 1000 * elapsed / max(
            1, config.log_every_steps if step % config.log_every_steps == 0 else step - start_step)}
        images_seen, t0 = 0, time.perf_counter()
        for i in sorted(active):
          scalars = {k: float(v[i]) for k, v in values.items()}
          if not all(math.isfinite(v) for v in scalars.values()):
            errors[names[i]] = (f'FloatingPointError: non-finite training metrics at step {step}: {scalars}. No '
                                'checkpoint was written for this state; lower optim.lr or enable optim.grad_clip.')
            logging.error('trial %s: %s', names[i], errors[names[i]])
            active.discard(i)
            left_at[i] = step
            continue
          writers[i].write(step, 'train', dict(scalars, **timing))
      epoch_end = step % steps_per_epoch == 0
      eval_now = (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or step == total_steps
      eval_metrics = {}
      if eval_now and active:
        out, lab, mask = train.collect_outputs(eval_fn, state, eval_loader(), mesh, config)
        for i in sorted(active):
          last_eval[i] = train.eval_metrics(trial_configs[i], out[:, i], lab, mask)
          writers[i].write(step, 'eval', last_eval[i])
          if config.metric in last_eval[i] and last_eval[i][config.metric] >= best[i].get(config.metric, -np.inf):
            best[i] = dict(last_eval[i], step=step)
          eval_metrics[i] = {k: float(v) for k, v in last_eval[i].items()} or None
        for name, reason in should_stop(step, steps_per_epoch).items():
          if name in names and names.index(name) in active:
            stopped[name] = reason
            logging.warning('trial %s: stopped at step %d (%s)', name, step, reason)
        t0 = time.perf_counter()
      stop = preemption.reached(step)
      checkpoint_now = step % config.checkpoint.every_steps == 0 or eval_now or stop or step == end_step
      if checkpoint_now:
        for lock in locks:
          if lock is not None:
            lock.refresh()
      for i in sorted(active):
        if checkpoint_now or names[i] in stopped:
          save(i, eval_metrics.get(i))
        if names[i] in stopped:
          active.discard(i)
          left_at[i] = step
      if stop:
        logging.warning('Preempted: saved step %d; rerun the same command to resume.', step)
        break
    for ckpts in managers:
      ckpts.wait()  # Every trial's last save is complete (or its failure reported) before the summaries.
  finally:
    for writer in writers:
      writer.close()
  summaries = []
  for i, name in enumerate(names):
    summary = {'step': left_at.get(i, step), 'total_steps': total_steps, 'final': last_eval[i], 'best': best[i],
               'completed': i in active and step >= total_steps,
               'preempted': stop and i in active and step < total_steps}
    summary.update({key: reason[name] for key, reason in (('error', errors), ('stopped', stopped)) if name in reason})
    summaries.append(summary)
  return summaries


# ---------------------------------------------------------------------------------------------------
# Command line: a group of a sweep's trials.

def main(argv=None) -> int:
  """Trains the named trials of a sweep as one group and writes each one's summary.json.

  Exit status 0; FAILED_TRIALS when a trial failed (its summary says why; the others went on);
  train.EXIT_PREEMPTED when a SIGTERM stopped the group after saving (rerunning resumes it); 1 on an
  error before training (one line).
  """
  import argparse  # noqa: PLC0415

  from spikingformer_jax import sweep, sweep_results  # noqa: PLC0415 (sweep imports this module)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sweep', required=True, help='experiments/sweeps/<name>.py')
  parser.add_argument('--root', required=True, help='the sweep root (parent of the trial workdirs)')
  parser.add_argument('--trials', required=True, help='comma-separated trial names of the sweep')
  parser.add_argument('--distributed', action='store_true', help='config.distributed=True (multi-host slices)')
  args = parser.parse_args(argv)
  cpu_runtime.apply_cpu_flags()
  compile_cache.enable()  # as spikingformer_jax.main: a rerun loads the group's compiled step
  runs = {r.name: r for r in sweep.expand(args.sweep, args.root)}
  names = [n for n in args.trials.split(',') if n]
  unknown = [n for n in names if n not in runs]
  if unknown or not names:
    parser.exit(2, f'error: --trials: {unknown or "none given"} not among the trials of {args.sweep}: '
                   f'{sorted(runs)}\n')
  group = [runs[n] for n in names]
  group_configs = [r.build_config() for r in group]
  for config in group_configs:
    config.distributed = config.distributed or args.distributed
  rule, metric = sweep.load_spec(args.sweep).early_stopping, group_configs[0].metric

  def should_stop(step, steps_per_epoch):  # the sweep's rule over every trial of the root, this group's included
    if rule is None:
      return {}
    results = sweep_results.collect([(r.name, r.overrides, r.workdir) for r in runs.values()], metric, args.root)
    return sweep_results.decide_stops(rule, results, names, metric, steps_per_epoch)

  try:
    summaries = train_and_evaluate(group_configs, [r.workdir for r in group], names=names, should_stop=should_stop)
  except (TrialsError, configs.ConfigError, checkpoint.CheckpointError, run_lock.RunLockError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if jax.process_index() != 0:
    return train.EXIT_PREEMPTED if any(s.get('preempted') for s in summaries) else 0
  for run, summary in zip(group, summaries):
    write_summary(run.workdir, summary)
    if summary.get('preempted'):
      print(f'{run.name} preempted at step {summary["step"]}; rerun the sweep to resume', flush=True)
      continue
    for line in train.format_summary(summary).splitlines():
      print(f'{run.name} {line}')
    for key in ('error', 'stopped'):
      if key in summary:
        print(f'{run.name} {key}: {summary[key]}', flush=True)
  if any('error' in s for s in summaries):
    return FAILED_TRIALS
  return train.EXIT_PREEMPTED if any(s.get('preempted') for s in summaries) else 0


if __name__ == '__main__':
  sys.exit(main())
