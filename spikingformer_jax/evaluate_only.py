"""`--mode=eval`: evaluate a checkpoint of the workdir (latest, best or a given step), or `init_from`'s."""
from __future__ import annotations

import jax

from spikingformer_jax import checkpoint, configs, sharding, tasks, train


def run(config, workdir, which: str = 'latest') -> dict:
  """Evaluates checkpoint `which` (latest, best by config.metric, or a step number) on the eval split.

  The workdir's own checkpoints come first; without any, `config.init_from` is evaluated.
  """
  configs.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  dm = tasks.get_task(config).data_module
  info = dm.dataset_info(config.data)
  source = workdir if checkpoint.has_training_checkpoints(workdir) else config.init_from
  if not source:
    raise checkpoint.CheckpointError(f'--mode=eval: {workdir} has no checkpoints and config.init_from is empty.')
  stored = checkpoint.load_model(source, which, config.metric)
  ctx, example = train.make_context(config, info)
  state, shardings = train.create_state(ctx, mesh, example, jax.random.PRNGKey(config.seed))
  fresh = {'params': state['params'], 'batch_stats': state['batch_stats']}
  try:
    merged, notes = train.merge_pretrained(fresh, stored.variables)
  except configs.ConfigError as e:
    raise train.misfit_error(stored, config, e) from None
  if notes:
    raise checkpoint.CheckpointError(f'{stored.path} does not contain the whole model: ' + '; '.join(notes))
  state = dict(state, **jax.device_put(merged, {k: shardings[k] for k in merged}))
  eval_fn = jax.jit(sharding.traced_in(mesh, train.make_eval_step(ctx)),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=sharding.batch_sharding(mesh))
  loader = dm.make_loader(config.data, config.data.eval_split, batch_size=config.eval_batch_size, train=False,
                          seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  result = train.evaluate(eval_fn, state, loader, mesh, config, info)
  return {'step': stored.step, 'total_steps': train.plan(config, info)[1], 'final': result, 'best': {},
          'checkpoint': str(stored.path), 'completed': True}
