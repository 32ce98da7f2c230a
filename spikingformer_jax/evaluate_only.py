"""`--mode=eval`: evaluate the latest checkpoint of a workdir, or the checkpoint named by `init_from`."""
from __future__ import annotations

import jax

from spikingformer_jax import checkpoint, configs, paths, sharding, train


def run(config, workdir) -> dict:
  configs.validate(config)
  sharding.maybe_initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  dm = train.data_module(config)
  info = dm.dataset_info(config.data)
  source = checkpoint.checkpoint_dir(workdir)
  if not source.is_dir() or not any(p.name.isdigit() for p in source.iterdir()):
    if not config.init_from:
      raise checkpoint.CheckpointError(f'--mode=eval: {workdir} has no checkpoints and config.init_from is empty.')
    source = paths.path(config.init_from)
  variables = checkpoint.load_variables(source)
  ctx, example = train.make_context(config, info)
  rng = jax.random.PRNGKey(config.seed)
  state, shardings = train.create_state(ctx, mesh, example, rng)
  fresh = {'params': state['params'], 'batch_stats': state['batch_stats']}
  merged, notes = train.merge_pretrained(fresh, variables)
  if notes:
    raise checkpoint.CheckpointError(f'{source} does not contain the whole model: ' + '; '.join(notes))
  state = dict(state, **jax.device_put(merged, {k: shardings[k] for k in merged}))
  eval_fn = jax.jit(sharding.traced_in(mesh, train.make_eval_step(ctx)),
                    in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=sharding.batch_sharding(mesh))
  loader = dm.make_loader(config.data, config.data.eval_split, batch_size=config.eval_batch_size, train=False,
                          seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  result = train.evaluate(eval_fn, state, loader, mesh, config, info)
  return {'step': 0, 'total_steps': 0, 'final': result, 'best': {}, 'source': str(source), 'completed': True}
