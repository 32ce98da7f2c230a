"""Vmapped trials' pieces: which configs may share a step, and hyperparameters as inputs equal to constants.

The end-to-end equality of K vmapped trials with their separate runs is in test_sweep_digits.py.
"""
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spikingformer_jax import mixup, optim, sweep, trials

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
import digits  # noqa: E402


def _config(**changes):
  return sweep.apply_overrides(digits.get_config(), changes)


def test_a_group_may_differ_only_in_optimizer_hyperparameters_and_seeds():
  ok = [_config(**{'optim.lr': 1e-3, 'seed': 1}), _config(**{'optim.weight_decay': 0.1, 'mixup.mixup_alpha': 0.2,
                                                              'optim.warmup_epochs': 0, 'label_smoothing': 0.1})]
  trials.check_group(ok, ['a', 'b'])
  hp = trials.hyperparams(ok)
  np.testing.assert_allclose(hp['lr'], [1e-3, 2e-3])
  np.testing.assert_allclose(hp['weight_decay'], [0.01, 0.1])
  np.testing.assert_allclose(hp['warmup_epochs'], [2, 0])
  assert all(v.dtype == np.float32 and v.shape == (2,) for v in hp.values())
  with pytest.raises(trials.TrialsError, match=r"differ in 'model.T' \(a: 4, b: 2\)"):
    trials.check_group([_config(), _config(**{'model.T': 2})], ['a', 'b'])
  with pytest.raises(trials.TrialsError, match="differ in 'batch_size'"):
    trials.check_group([_config(), _config(batch_size=16)], ['a', 'b'])


def test_each_trials_schedule_equals_its_configs_schedule():
  steps = jnp.arange(0, 200, 7)
  for changes in ({}, {'optim.warmup_epochs': 0}, {'optim.lr': 5e-3, 'optim.min_lr': 1e-4, 'optim.warmup_lr': 1e-3},
                  {'optim.per_epoch_schedule': True}):
    config = _config(**changes)
    expected = optim.make_schedule(config.optim, config.num_epochs, steps_per_epoch=10)(steps)
    hp = {k: v[0] for k, v in trials.hyperparams([config]).items()}
    traced = jax.jit(lambda s, h: trials.trial_schedule(config, h, 10)(s))(steps, hp)  # noqa: B023
    np.testing.assert_allclose(traced, expected, rtol=1e-6, err_msg=str(changes))


def test_traced_mixup_and_smoothing_equal_the_constant_ones():
  """One compiled step serves every trial's alphas: a traced 0 skips mixing exactly as a constant 0 does."""
  images = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1))
  labels = jnp.arange(6) % 4
  kwargs = dict(num_classes=4, prob=0.9, switch_prob=0.5)
  traced = jax.jit(lambda rng, s, m, c: mixup.mix_batch(rng, images, labels, smoothing=s, mixup_alpha=m,
                                                        cutmix_alpha=c, **kwargs))
  for mixup_alpha, cutmix_alpha in ((0.0, 0.0), (0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
    constant = jax.jit(functools.partial(mixup.mix_batch, images=images, labels=labels, smoothing=0.1,
                                         mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, **kwargs))
    for seed in range(3):
      rng = jax.random.PRNGKey(seed)
      for want, got in zip(constant(rng), traced(rng, 0.1, mixup_alpha, cutmix_alpha)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f'{mixup_alpha}, {cutmix_alpha}')


def test_injected_learning_rate_and_weight_decay_update_like_the_plain_optimizer():
  config = _config(**{'optim.weight_decay': 0.3})
  params = {'w': jnp.linspace(-1, 1, 6).reshape(2, 3), 'b': jnp.ones(3)}
  grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.05, params)
  plain = optim.make_optimizer(config.optim, lambda step: 0.02, params)
  injected = trials.make_optimizer(config, params)
  state = plain.init(params)
  for _ in range(3):  # the inner state is the plain optimizer's: it goes in and comes out unchanged in form
    want, next_state = plain.update(grads, state, params)
    wrapped = optax.InjectStatefulHyperparamsState(count=jnp.zeros((), jnp.int32), hyperparams={
        'learning_rate': jnp.float32(0.02), 'weight_decay': jnp.float32(0.3)}, hyperparams_states={}, inner_state=state)
    got, new_wrapped = injected.update(grads, wrapped, params)
    assert jax.tree_util.tree_structure(new_wrapped.inner_state) == jax.tree_util.tree_structure(next_state)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    state = next_state
  assert float(got['b'][0]) != float(got['w'][0, 0])  # 1-D parameters still get no decay (sanity of the mask)

