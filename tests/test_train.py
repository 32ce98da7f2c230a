"""The trainer: sharded steps equal single-device steps, exact resumption, SIGTERM, fine-tuning, schedule."""
import functools
import itertools
import json
import os
import pathlib
import resource
import signal
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from spikingformer_jax import checkpoint, configs, mixup, optim, sharding, train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))
import digits  # noqa: E402


def tiny_config(**changes):
  c = digits.get_config()
  c.model.overrides = {'embed_dim': 32, 'num_heads': 2}
  c.batch_size = 16
  c.eval_batch_size = 40
  c.data.max_train_examples = 160
  c.data.max_eval_examples = 80
  c.num_epochs = 2
  c.log_every_steps = 5
  c.progress_bar = False
  c.checkpoint.async_save = False
  for k, v in changes.items():
    target = c
    *path, leaf = k.split('.')
    for p in path:
      target = target[p]
    target[leaf] = v
  return c


def _context(config, devices):
  from spikingformer_jax import data
  return train.make_context(config, data.dataset_info(config.data))


def _one_step(config, devices, batch):
  mesh = sharding.make_mesh(config.mesh, devices)
  ctx, example = _context(config, devices)
  state, shardings = train.create_state(ctx, mesh, example, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(ctx), in_shardings=(shardings, sharding.batch_sharding(mesh),
                                                            sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  gbatch = sharding.global_batch(batch, mesh)
  state, metrics = step(state, gbatch, jax.random.PRNGKey(3))
  return jax.device_get(state), jax.device_get(metrics), shardings


def test_data_parallel_and_fsdp_steps_equal_single_device():
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  # Adam's eps = 1 keeps the update a smooth function of the gradient (with a tiny eps, near-zero gradient
  # entries become +-lr sign flips under any reordering of float sums), so parameters compare meaningfully.
  smooth = {'optim.eps': 1.0, 'optim.lr': 0.5, 'optim.warmup_epochs': 0}
  single, m1, _ = _one_step(tiny_config(**{'mesh.data': 1}, **smooth), jax.devices()[:1], batch)
  dp, m8, _ = _one_step(tiny_config(**smooth), jax.devices(), batch)
  fsdp_cfg = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 4}, **smooth)
  fsdp, mf, fsdp_shardings = _one_step(fsdp_cfg, jax.devices(), batch)
  # FSDP really shards: the big kernels are split over 'fsdp'.
  specs = [s.spec for s in jax.tree_util.tree_leaves(fsdp_shardings['params'])]
  assert any('fsdp' in tuple(s) for s in specs)
  # Tolerance: the same math with a different reduction order over devices (float32).
  for other, m in ((dp, m8), (fsdp, mf)):
    np.testing.assert_allclose(m['loss'], m1['loss'], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(single['params']), jax.tree_util.tree_leaves(other['params'])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree_util.tree_leaves(single['batch_stats']),
                    jax.tree_util.tree_leaves(other['batch_stats'])):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _final_variables(workdir):
  return checkpoint.load_variables(workdir)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  config = tiny_config(**{'mesh.data': 1, 'mixup.mixup_alpha': 0.5, 'label_smoothing': 0.1})
  # One device so both runs share the exact same program; total 20 steps over 2 epochs.
  full = train.train_and_evaluate(config, tmp_path / 'full', devices=jax.devices()[:1])
  part1 = train.train_and_evaluate(config, tmp_path / 'resumed', stop_after_steps=7,
                                   devices=jax.devices()[:1])
  assert part1['step'] == 7 and not part1['completed']
  part2 = train.train_and_evaluate(config, tmp_path / 'resumed', devices=jax.devices()[:1])
  assert part2['completed'] and part2['step'] == full['step'] == 20
  a, b = _final_variables(tmp_path / 'full'), _final_variables(tmp_path / 'resumed')
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)  # Bitwise on CPU.
  assert full['final']['top1'] == part2['final']['top1']
  # Metrics land in JSONL and TensorBoard files.
  assert (tmp_path / 'full' / 'metrics.jsonl').read_text().count('"split": "eval"') == 2
  assert list((tmp_path / 'full' / 'tensorboard').iterdir())


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
  config = tiny_config(**{'mesh.data': 1, 'total_steps': 100000})
  timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    summary = train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  finally:
    timer.cancel()
  assert summary['preempted'] and not summary['completed'] and 1 <= summary['step'] < 100000
  manager_steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert manager_steps[-1] == summary['step']
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
      signal.getsignal(signal.SIGTERM))


def _metric_rows(workdir, split='train') -> list[dict]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [l for l in lines if l['split'] == split]


def _metric_steps(workdir, split='train'):
  return [l['step'] for l in _metric_rows(workdir, split)]


def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_falls_back(tmp_path, caplog):
  # T = 1: a quarter of the tracing and compiling, the same checkpoint logic.
  config = tiny_config(**{'mesh.data': 1, 'model.T': 1, 'total_steps': 4, 'checkpoint.every_steps': 2,
                          'log_every_steps': 1})
  train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  ckpts = tmp_path / 'checkpoints'
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ['2', '4']
  step2 = checkpoint.load_variables(ckpts / '2')
  # Another model on the same workdir is refused (an error, not damage: nothing moves).
  wider = tiny_config(**{'mesh.data': 1, 'model.T': 1, 'total_steps': 6})
  wider.model.overrides = {'embed_dim': 64, 'num_heads': 2}
  with pytest.raises(checkpoint.CheckpointError, match=r'step 4 .* does not fit .*stored \(32,\), model \(64,\)'):
    train.train_and_evaluate(wider, tmp_path, devices=jax.devices()[:1])
  assert (ckpts / '4').is_dir() and not (tmp_path / checkpoint.DAMAGED_DIR).exists()
  # An interrupted save leaves only a temporary directory: never picked up.
  (ckpts / '9.orbax-checkpoint-tmp-1234').mkdir()
  # Damage the array data of step 4.
  for f in (ckpts / '4' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and f.name not in ('_METADATA', '_CHECKPOINT_METADATA'):
      f.write_bytes(b'garbage')

  resumed = tiny_config(**{'mesh.data': 1, 'model.T': 1, 'total_steps': 6, 'checkpoint.every_steps': 2,
                           'log_every_steps': 1})
  with caplog.at_level('WARNING'):
    summary = train.train_and_evaluate(resumed, tmp_path, devices=jax.devices()[:1])
  assert summary['completed'] and summary['step'] == 6
  moved, = (tmp_path / checkpoint.DAMAGED_DIR).iterdir()  # Renamed, not deleted.
  assert moved.name.startswith('4-') and (moved / 'state').is_dir()
  assert any('Checkpoint step 4 cannot be restored' in r.message and str(moved) in r.message for r in caplog.records)
  # The run restarted from step 2: steps 3 and 4 were trained again, their old metrics lines dropped.
  assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ['2', '4', '6']
  np.testing.assert_array_equal(checkpoint.load_variables(ckpts / '2')['params']['head']['kernel'],
                                step2['params']['head']['kernel'])


def test_retention_keeps_the_latest_and_the_best_across_runs(tmp_path):
  cfg = tiny_config().checkpoint
  cfg.keep = 2
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  top1 = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2, 5: 0.3, 6: None, 7: None}

  def run(steps):
    ckpts = checkpoint.Checkpoints(tmp_path, cfg, 'top1')
    for s in steps:
      metrics = None if top1[s] is None else {'top1': top1[s]}
      ckpts.save(s, {'w': jnp.full((3,), float(s))}, data_iter, {}, metrics)
    ckpts.wait()
    ckpts.close()
    return sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())

  assert run([1, 2, 3]) == [2, 3]
  # A later run (a restart) prunes what the earlier one wrote too: the 2 latest plus the best (step 2).
  assert run([4, 5]) == [2, 4, 5]
  assert run([6, 7]) == [2, 6, 7]


def test_a_failed_save_stops_training_at_once_and_keeps_the_last_checkpoint(tmp_path):
  config = tiny_config(**{'mesh.data': 1, 'model.T': 1, 'total_steps': 12, 'checkpoint.every_steps': 3,
                          'log_every_steps': 1, 'checkpoint.async_save': True})
  train.train_and_evaluate(config, tmp_path, stop_after_steps=3, devices=jax.devices()[:1])
  saved = checkpoint.load_variables(tmp_path)
  # "Disk full": no file may grow past 48 KB, less than the checkpoint's array files and metadata.
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (48 << 10, hard))
  try:
    with pytest.raises(checkpoint.CheckpointError) as failure:
      train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(failure.value)
  assert '\n' not in message
  assert f'Saving checkpoint step 6 to {tmp_path}/checkpoints/6 failed' in message
  assert 'File too large' in message and 'the last complete checkpoint, step 3, is intact' in message
  # Stopped as soon as the failure was known, at the latest at the next save; step 3 is still the
  # latest checkpoint and loads unchanged.
  assert max(_metric_steps(tmp_path)) <= 9
  manager = checkpoint.Checkpoints(tmp_path, config.checkpoint, 'top1')
  assert manager.latest_step() == 3
  manager.close()
  for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(checkpoint.load_variables(tmp_path))):
    np.testing.assert_array_equal(a, b)


def test_fine_tune_restores_backbone_and_reinitialises_head(tmp_path):
  pre = tiny_config(**{'mesh.data': 1, 'total_steps': 2})
  train.train_and_evaluate(pre, tmp_path / 'pre', devices=jax.devices()[:1])
  pretrained = checkpoint.load_variables(tmp_path / 'pre')
  # A 3-class dataset (digits 0-2 written as an npz source) with a new head.
  from sklearn.datasets import load_digits
  d = load_digits()
  keep = d.target < 3
  images = (d.images[keep] * (255 / 16)).astype(np.uint8)[..., None]
  (tmp_path / 'npz').mkdir()
  np.savez(tmp_path / 'npz' / 'train.npz', images=images[:400], labels=d.target[keep][:400])
  np.savez(tmp_path / 'npz' / 'test.npz', images=images[400:], labels=d.target[keep][400:])
  ft = tiny_config(**{'mesh.data': 1, 'data.name': 'npz', 'data.data_dir': str(tmp_path / 'npz'),
                      'model.num_classes': 3, 'init_from': str(tmp_path / 'pre'), 'freeze': '^tokenizer/',
                      'optim.warmup_epochs': 0})
  ft.data.augment = {'mean': [0.5], 'std': [0.5], 'randaug': '', 'hflip': 0.0, 'reprob': 0.0}
  ft.data.max_train_examples = -1
  ft.data.max_eval_examples = -1
  ctx, example = _context(ft, jax.devices()[:1])
  mesh = sharding.make_mesh(ft.mesh, jax.devices()[:1])
  state, _ = train.create_state(ctx, mesh, example, jax.random.PRNGKey(0), ft.init_from)
  new, old = traverse_util.flatten_dict(jax.device_get(state['params'])), traverse_util.flatten_dict(
      pretrained['params'])
  for path, value in new.items():
    if path[0] == 'head':
      assert value.shape[-1] == 3
    else:
      np.testing.assert_array_equal(value, old[path])
  # 100 steps: BatchNorm running variances start at 1 and decay as 0.9^steps towards the (small) real ones.
  summary = train.train_and_evaluate(dict_to_config(ft, total_steps=100), tmp_path / 'ft',
                                     devices=jax.devices()[:1])
  tuned = traverse_util.flatten_dict(checkpoint.load_variables(tmp_path / 'ft')['params'])
  # Frozen tokenizer unchanged, blocks trained.
  for path, value in tuned.items():
    if path[0] == 'tokenizer':
      np.testing.assert_array_equal(value, old[path])
  assert any(not np.array_equal(v, old[p]) for p, v in tuned.items() if p[0].startswith('block'))
  assert summary['final']['top1'] > 0.5  # 3 classes: chance is 1/3; the frozen stem is nearly random
  # A backbone of another width is refused with the mismatched keys listed.
  bad = tiny_config(**{'mesh.data': 1, 'init_from': str(tmp_path / 'pre')})
  bad.model.overrides = {'embed_dim': 64, 'num_heads': 2}
  ctx, example = _context(bad, jax.devices()[:1])
  with pytest.raises(ValueError, match='shape mismatch: params/tokenizer/stage0/conv/kernel'):
    train.create_state(ctx, mesh, example, jax.random.PRNGKey(0), bad.init_from)


def dict_to_config(config, **changes):
  c = config.copy_and_resolve_references()
  for k, v in changes.items():
    c[k] = v
  return c


def test_timm_schedule_semantics_match_reference_logs():
  lr = lambda e, **kw: float(optim.timm_cosine_lr(e, **kw))
  imagenet = dict(lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=20, num_epochs=300)
  assert abs(lr(20, **imagenet) - 4.946e-4) < 1e-7  # the 8-768 log: epoch 20 LR = 4.946e-4
  assert lr(0, **imagenet) == pytest.approx(1e-6)
  assert lr(305, **imagenet) == pytest.approx(1e-5)  # cooldown epochs at min_lr
  dvs = dict(lr=1e-3, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=10, num_epochs=96)
  assert lr(1, **dvs) == pytest.approx(1.09e-4)  # the CIFAR10-DVS log: epoch 1 LR 1.09e-4
  # Per-epoch stepping holds the LR constant within an epoch.
  cfg = configs.base_config().optim
  cfg.warmup_epochs = 2
  sched = optim.make_schedule(cfg, 10, steps_per_epoch=5)
  assert float(sched(5)) == float(sched(9)) != float(sched(10))


def test_no_weight_decay_on_one_dimensional_parameters():
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  cfg = configs.base_config().optim
  cfg.weight_decay = 0.5
  tx = optim.make_optimizer(cfg, lambda s: 0.1, params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(updates['b'][0]) == 0.0 and float(updates['w'][0, 0]) == pytest.approx(-0.1 * 0.5)


def test_mixup_and_cutmix_targets_and_areas():
  rng = jax.random.PRNGKey(0)
  images = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 8, 8, 1))
  labels = jnp.arange(4)
  # Label smoothing alone.
  _, t = mixup.mix_batch(rng, images, labels, num_classes=4, smoothing=0.1, mixup_alpha=0, cutmix_alpha=0,
                         prob=1, switch_prob=0.5)
  np.testing.assert_allclose(np.asarray(t[0]), [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  for seed in range(5):
    out, t = mixup.mix_batch(jax.random.PRNGKey(seed), images, labels, num_classes=4, smoothing=0.0,
                             mixup_alpha=0, cutmix_alpha=1.0, prob=1, switch_prob=0.5)
    # Cutmix: the target weight of the partner equals the pasted area fraction.
    pasted = float(jnp.mean(out[0] == 3.0))
    np.testing.assert_allclose(float(t[0, 3]), pasted, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t.sum(-1)), 1.0, rtol=1e-6)
    out, t = mixup.mix_batch(jax.random.PRNGKey(seed), images, labels, num_classes=4, smoothing=0.0,
                             mixup_alpha=0.8, cutmix_alpha=0, prob=1, switch_prob=0.5)
    lam = float(t[0, 0])
    np.testing.assert_allclose(np.asarray(out[0]), lam * 0 + (1 - lam) * 3.0, rtol=1e-5)
  out, t = mixup.mix_batch(rng, images, labels, num_classes=4, smoothing=0.0, mixup_alpha=0.8, cutmix_alpha=1.0,
                           prob=1, switch_prob=0.5, enabled=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images))


def test_mixup_groups_mix_within_each_slice():
  """groups=G mixes each of G slices with itself reversed (each device its own examples), with the same lambda
  and box as one group; groups=1 pairs the whole batch end to end."""
  images = jnp.arange(8.0)[:, None, None, None] * jnp.ones((8, 4, 4, 1))
  labels = jnp.arange(8)
  kwargs = dict(num_classes=8, smoothing=0.0, prob=1, switch_prob=0.5)
  for seed, alphas in ((0, dict(mixup_alpha=0.8, cutmix_alpha=0)), (1, dict(mixup_alpha=0, cutmix_alpha=1.0))):
    whole, whole_t = mixup.mix_batch(jax.random.PRNGKey(seed), images, labels, **alphas, **kwargs)
    halves, halves_t = mixup.mix_batch(jax.random.PRNGKey(seed), images, labels, **alphas, **kwargs, groups=2)
    partners = {'whole': [7, 6, 5, 4, 3, 2, 1, 0], 'halves': [3, 2, 1, 0, 7, 6, 5, 4]}
    for out, t, name in ((whole, whole_t, 'whole'), (halves, halves_t, 'halves')):
      for i, j in enumerate(partners[name]):
        lam = float(t[i, i])
        assert set(np.unique(np.asarray(out[i]))) <= {float(i), float(j)} or alphas['cutmix_alpha'] == 0
        np.testing.assert_allclose(float(t[i, j]), 1 - lam, atol=1e-6)
        if alphas['cutmix_alpha'] == 0:
          np.testing.assert_allclose(np.asarray(out[i]), lam * i + (1 - lam) * j, rtol=1e-5)
    np.testing.assert_allclose(np.diag(np.asarray(whole_t)), np.diag(np.asarray(halves_t)))  # one lambda
  # One group per device; a device with one example is paired with its neighbour, never with itself.
  assert [mixup.device_groups(b, 8) for b in (64, 16, 8, 4)] == [8, 8, 4, 2]
  assert mixup.device_groups(16, 16) == 8 and mixup.device_groups(1, 1) == 1 and mixup.device_groups(32, 1) == 1
  with pytest.raises(ValueError, match='3 mixup groups'):
    mixup.mix_batch(jax.random.PRNGKey(0), images, labels, mixup_alpha=0.8, cutmix_alpha=0, **kwargs, groups=3)


def test_config_validation_names_the_field():
  c = tiny_config()
  with pytest.raises(configs.ConfigError, match='optim.lr'):
    c.optim.lr = -1.0
    configs.validate(c)
  c = tiny_config()
  c.unlock() if hasattr(c, 'unlock') else None
  c.optim.lerning_rate = 1.0
  with pytest.raises(configs.ConfigError, match="Unknown config key optim.'lerning_rate'"):
    configs.validate(c)


def test_gradient_accumulation_averages_microbatch_gradients():
  """With accum=2, the update equals AdamW applied to the mean of the two microbatch gradients."""
  rng = np.random.default_rng(1)
  batch = {'image': rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  # Adam eps = 1: a smooth update, so float reordering of near-zero gradients cannot flip signs.
  cfg = tiny_config(**{'mesh.data': 1, 'grad_accum_steps': 2, 'label_smoothing': 0.0, 'optim.eps': 1.0})
  ctx, example = _context(cfg, jax.devices()[:1])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  state, _ = train.create_state(ctx, mesh, example, jax.random.PRNGKey(0))
  state = jax.device_get(state)
  new_state, _ = jax.jit(train.make_train_step(ctx))(state, batch, jax.random.PRNGKey(2))

  def grads_of(mb, stats):
    def loss(p):
      out, nv = ctx.model.apply({'params': p, 'batch_stats': stats}, mb['image'], train=True, mutable=['batch_stats'])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, mb['label'])), nv['batch_stats']
    return jax.grad(loss, has_aux=True)(state['params'])

  half = lambda i: jax.tree_util.tree_map(lambda x: x[i * 8:(i + 1) * 8], batch)
  g1, stats1 = grads_of(half(0), state['batch_stats'])
  g2, stats2 = grads_of(half(1), stats1)
  mean_g = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  updates, _ = ctx.tx.update(mean_g, state['opt_state'], state['params'])
  expected = optax.apply_updates(state['params'], updates)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(new_state['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(stats2), jax.tree_util.tree_leaves(new_state['batch_stats'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _cosine(frac):
  """The LR of `_budget_config` at a fraction of its schedule (closed form: no warmup, 2e-3 down to 1e-5)."""
  return 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + np.cos(np.pi * frac))


def _budget_config(**changes):
  return tiny_config(**{'mesh.data': 1, 'time_budget_minutes': 10.0, 'optim.warmup_epochs': 0,
                        'optim.cooldown_epochs': 0, 'optim.lr': 2e-3, 'optim.min_lr': 1e-5, **changes})


def test_a_budget_step_takes_the_lr_of_the_schedule_where_the_clock_or_the_steps_stand():
  """On a time budget the schedule is read at max(step, progress x total steps): the step equals a plain step
  whose LR is held constant at that point of the cosine (closed form)."""
  rng = np.random.default_rng(4)
  batch = {'image': rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  config = _budget_config(**{'optim.eps': 1.0, 'model.T': 1})  # a smooth update (see the data-parallel test)
  ctx, example = _context(config, jax.devices()[:1])
  assert ctx.budget_steps == 20  # 160 examples / 16 per step x 2 epochs
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  fresh = jax.device_get(train.create_state(ctx, mesh, example, jax.random.PRNGKey(0))[0])
  budget_step = jax.jit(train.make_train_step(ctx))
  for step, progress, at in ((0, 0.0, 0.0), (0, 0.5, 0.5), (0, 0.8, 0.8), (15, 0.1, 0.75), (3, 1.0, 1.0)):
    state = dict(fresh, step=np.int32(step))
    new, metrics = budget_step(state, batch, jax.random.PRNGKey(2), train.budget_inputs(progress))
    assert float(metrics['lr']) == pytest.approx(_cosine(at), rel=1e-5), (step, progress)
    plain = tiny_config(**{'mesh.data': 1, 'optim.eps': 1.0, 'model.T': 1, 'optim.warmup_epochs': 0,
                           'optim.lr': _cosine(at), 'optim.min_lr': _cosine(at)})
    plain_ctx, _ = _context(plain, jax.devices()[:1])
    expected, _ = jax.jit(train.make_train_step(plain_ctx))(state, batch, jax.random.PRNGKey(2))
    for a, b in zip(jax.tree_util.tree_leaves(expected['params']), jax.tree_util.tree_leaves(new['params'])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)


def _train_lrs(workdir):
  return [(l['step'], l['lr']) for l in _metric_rows(workdir)]


def _ticking_clock():
  """A budget clock that advances one second each time it is read: the trainer reads it once per step."""
  return functools.partial(next, itertools.count())


def test_a_run_on_a_time_budget_anneals_by_the_clock_and_resumes_with_what_is_left(tmp_path):
  budget_s = 12
  config = _budget_config(**{'time_budget_minutes': budget_s / 60, 'total_steps': 10**6, 'log_every_steps': 1,
                             'checkpoint.every_steps': 10**6, 'model.T': 1})
  first = train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1], clock=_ticking_clock())
  assert first['completed'] and not first['preempted'] and first['step'] == budget_s - 1
  # Step k starts k ticks into the budget (the first tick is start-up): the cosine at k / budget, step
  # counts far behind (10^6 steps).
  logged = _train_lrs(tmp_path)
  np.testing.assert_allclose([lr for _, lr in logged], [_cosine(k / budget_s) for k in range(1, budget_s)], rtol=1e-5)
  spent = json.loads((tmp_path / 'checkpoints' / str(first['step']) / 'meta' / 'metadata').read_text())[
      train.BUDGET_SPENT_KEY]
  assert spent >= budget_s
  # The same command again: nothing left of the budget, no step taken.
  again = train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1], clock=_ticking_clock())
  assert again['step'] == first['step'] and again['completed']
  # Twice the budget: the run goes on from where the first one left the schedule, not from its top.
  longer = train.train_and_evaluate(dict_to_config(config, time_budget_minutes=2 * budget_s / 60), tmp_path,
                                    devices=jax.devices()[:1], clock=_ticking_clock())
  resumed = [lr for step, lr in _train_lrs(tmp_path) if step > first['step']]
  assert longer['step'] - first['step'] == len(resumed) == 2 * budget_s - spent - 1
  np.testing.assert_allclose(resumed, [_cosine((spent + j) / (2 * budget_s)) for j in range(1, len(resumed) + 1)],
                             rtol=1e-5)


def test_a_run_on_a_time_budget_that_its_steps_end_first_keeps_the_step_schedule(tmp_path):
  config = _budget_config(**{'log_every_steps': 1, 'model.T': 1})  # 20 steps in a 10-minute budget
  summary = train.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1], clock=lambda: 0.0)
  assert summary['step'] == summary['total_steps'] == 20 and summary['completed']
  ctx, _ = _context(config, jax.devices()[:1])
  logged = _train_lrs(tmp_path)
  assert [s for s, _ in logged] == list(range(1, 21))
  np.testing.assert_allclose([lr for _, lr in logged], [float(ctx.schedule(s - 1)) for s, _ in logged], rtol=1e-5)
