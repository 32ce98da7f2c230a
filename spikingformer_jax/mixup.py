"""On-device mixup / cutmix with label smoothing (timm's `Mixup`, batch mode), as a pure function.

Each example is mixed with the batch flipped along its first axis, with one lambda per batch:
with probability `prob` a mix happens, cutmix is chosen with `switch_prob` when both alphas are
positive, and cutmix's lambda is corrected to the exact pasted area. Targets are smoothed one-hots
(off = s/K, on = 1 - s + s/K) mixed with the same lambda. Works for images `[B, H, W, C]` and frame
stacks `[B, T, H, W, C]` (the box covers H, W of every frame).

`groups` > 1 flips each of that many equal slices of the batch on its own. The trainer passes
`device_groups`: one group per device the batch is split over, so each device mixes the examples it holds, as
each GPU of the reference's distributed run mixes its own batch (timm's `Mixup` runs per process), and no
example crosses devices. The batch is shuffled, so pairing within groups draws the same pairs' distribution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box_mask(rng, lam, height, width):
  """A box of area fraction (1 - lam) at a uniform centre, clipped to the image (timm's rand_bbox)."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  area = (y1 - y0) * (x1 - x0)
  return inside, 1.0 - area / (height * width)


def _beta_or_one(rng, alpha):
  """Beta(alpha, alpha), or exactly 1 (no mixing) where alpha is 0; alpha may be traced."""
  if isinstance(alpha, (int, float)):
    return jax.random.beta(rng, alpha, alpha) if alpha > 0 else jnp.float32(1.0)
  positive = alpha > 0
  safe = jnp.where(positive, alpha, 1.0)
  return jnp.where(positive, jax.random.beta(rng, safe, safe), 1.0)


def device_groups(batch_size: int, shards: int) -> int:
  """The mixup groups of a batch split over `shards` devices: one per device, or where a device holds a
  single example (which would be mixed with itself), the fewest neighbouring devices that hold two."""
  return max((g for g in range(1, shards + 1) if shards % g == 0 and batch_size // g >= 2), default=1)


def _flip(x, groups: int):
  """x with each of `groups` equal slices of its first axis reversed."""
  return x.reshape((groups, -1) + x.shape[1:])[:, ::-1].reshape(x.shape)


def mix_batch(rng, images, labels, *, num_classes, smoothing, mixup_alpha, cutmix_alpha, prob, switch_prob,
              enabled=True, groups: int = 1):
  """Returns (mixed images, soft targets). `enabled` may be a traced bool (mixup switched off late).

  `smoothing` and the alphas may be traced too (one value per vmapped trial): a traced alpha of 0
  gives the same batch and targets as a Python 0.
  """
  targets = smooth_one_hot(labels, num_classes, smoothing)
  static_zero = lambda a: isinstance(a, (int, float)) and a <= 0
  if static_zero(mixup_alpha) and static_zero(cutmix_alpha):
    return images, targets
  if images.shape[0] % groups:
    raise ValueError(f'A batch of {images.shape[0]} does not split into {groups} mixup groups.')
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jnp.logical_and(jax.random.uniform(k_apply) < prob, enabled)
  mixup_on, cutmix_on = jnp.asarray(mixup_alpha) > 0, jnp.asarray(cutmix_alpha) > 0
  use_cutmix = jnp.where(mixup_on & cutmix_on, jax.random.uniform(k_switch) < switch_prob, cutmix_on)
  lam_mix = _beta_or_one(k_mix, mixup_alpha)
  lam_cut = _beta_or_one(k_cut, cutmix_alpha)
  height, width = images.shape[-3], images.shape[-2]
  inside, lam_box = _cutmix_box_mask(k_box, lam_cut, height, width)
  flipped = _flip(images, groups)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  cut = jnp.where(inside[:, :, None], flipped, images)
  out = jnp.where(use_cutmix, cut, mixed)
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  out = jnp.where(apply, out, images).astype(images.dtype)
  lam = jnp.where(apply, lam, 1.0)
  return out, lam * targets + (1.0 - lam) * _flip(targets, groups)
