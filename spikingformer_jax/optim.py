"""The reference's optimisation recipe in optax: timm's AdamW + warmup/cosine/cooldown schedule.

timm semantics (its `CosineLRScheduler`, which the reference's train.py uses): the cosine runs over t in
[0, num_epochs] and the linear warmup from `warmup_lr` *overrides* its first `warmup_epochs`; after
`num_epochs` the LR stays at `min_lr` for `cooldown_epochs`. timm steps the schedule once per epoch
(`per_epoch_schedule=True`).
No weight decay on biases and other 1-D parameters (timm's `create_optimizer_v2`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def timm_cosine_lr(epoch, *, lr, min_lr, warmup_lr, warmup_epochs, num_epochs):
  """The LR at a (possibly fractional) epoch; pure jnp so it runs inside jit.

  The hyperparameters may be traced (one value per vmapped trial, spikingformer_jax.trials); a traced
  warmup_epochs of 0 selects the cosine everywhere, as a Python 0 does.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * jnp.minimum(epoch, num_epochs) / num_epochs))
  if isinstance(warmup_epochs, (int, float)) and warmup_epochs <= 0:
    return cosine
  warm = warmup_lr + epoch * (lr - warmup_lr) / jnp.maximum(warmup_epochs, 1e-9)
  return jnp.where(epoch < warmup_epochs, warm, cosine)


def make_schedule(optim_cfg, num_epochs: int, steps_per_epoch: int):
  def schedule(step):
    epoch = step / steps_per_epoch
    if optim_cfg.per_epoch_schedule:
      epoch = jnp.floor(epoch)
    return timm_cosine_lr(epoch, lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, warmup_lr=optim_cfg.warmup_lr,
                          warmup_epochs=optim_cfg.warmup_epochs, num_epochs=num_epochs)
  return schedule


def unit_rate(count):
  """A learning rate of 1, as a schedule (so the optimizer state keeps its step count): for runs whose step
  sets the LR itself and multiplies the updates by it (AdamW applies its LR last, so that is exact)."""
  del count
  return 1.0


def decay_mask(params):
  """True for parameters that get weight decay: every tensor with more than one dimension."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def frozen_labels(params, freeze_regex: str):
  """'frozen' / 'trainable' per leaf; the regex matches '/'-joined parameter paths."""
  pattern = re.compile(freeze_regex) if freeze_regex else None
  flat = traverse_util.flatten_dict(params)
  labels = {k: 'frozen' if pattern and pattern.search('/'.join(k)) else 'trainable' for k in flat}
  return traverse_util.unflatten_dict(labels)


def make_optimizer(optim_cfg, schedule, params, freeze_regex: str = '', weight_decay=None
                   ) -> optax.GradientTransformation:
  """AdamW on `schedule`; `weight_decay` (default optim_cfg.weight_decay) may be a traced value."""
  if optim_cfg.name != 'adamw':
    raise ValueError(f'config.optim.name = {optim_cfg.name!r}: only "adamw" (the reference recipe) is supported.')
  weight_decay = optim_cfg.weight_decay if weight_decay is None else weight_decay
  tx = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                   weight_decay=weight_decay, mask=decay_mask)
  if optim_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx)
  if freeze_regex:
    labels = frozen_labels(params, freeze_regex)
    if 'trainable' not in jax.tree_util.tree_leaves(labels):
      raise ValueError(f'config.freeze = {freeze_regex!r} freezes every parameter.')
    tx = optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx
