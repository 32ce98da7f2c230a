"""Augmentations: timm RandAugment/erasing semantics, SNNAugmentWide geometry, determinism, shapes."""
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from spikingformer_jax.data import augment, pipeline


def test_parse_randaug_reference_strings():
  cifar = augment.parse_randaug('rand-m9-n1-mstd0.4-inc1')
  assert (cifar.magnitude, cifar.num_ops, cifar.magnitude_std) == (9, 1, 0.4)
  assert cifar.ops == augment.RAND_INCREASING_TRANSFORMS and len(cifar.ops) == 15
  imagenet = augment.parse_randaug('rand-m9-mstd0.5-inc1')
  assert (imagenet.num_ops, imagenet.magnitude_std, imagenet.magnitude_max) == (2, 0.5, 10)
  assert augment.parse_randaug('rand-m7-mstd101').magnitude_std == math.inf
  assert augment.parse_randaug('rand').ops == augment.RAND_TRANSFORMS
  with pytest.raises(ValueError, match="unknown section 'x3'"):
    augment.parse_randaug('rand-m9-x3')


def _photo(seed=0, size=(24, 20)):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))


@pytest.mark.parametrize('name,level,expected', [
    ('Invert', 5, lambda a: 255 - a),
    ('SolarizeIncreasing', 10, lambda a: 255 - a),  # threshold 256 - 256 = 0: every pixel inverted
    ('Solarize', 10, lambda a: a),  # threshold 256: nothing inverted
    ('PosterizeIncreasing', 10, lambda a: np.zeros_like(a)),  # keep 0 bits
    ('PosterizeIncreasing', 0, lambda a: a & 0xF0),  # keep 4 bits
    ('SolarizeAdd', 10, lambda a: np.where(a < 128, np.minimum(255, a.astype(int) + 110), a)),
    ('Rotate', 0, lambda a: a),
    ('ShearX', 0, lambda a: a),
])
def test_randaugment_ops_closed_forms(name, level, expected):
  img = _photo()
  out = augment.apply_op(img, name, level, np.random.default_rng(0), Image.BICUBIC, (128, 128, 128))
  a = np.asarray(img)
  np.testing.assert_array_equal(np.asarray(out), expected(a).astype(np.uint8))


def test_translate_rel_moves_by_45_percent_at_level_10():
  a = np.zeros((20, 20, 3), np.uint8)
  a[:, 15:] = 255
  out = np.asarray(augment.apply_op(Image.fromarray(a), 'TranslateXRel', 10, np.random.default_rng(1),
                                    Image.NEAREST, (7, 7, 7)))
  shift = 0.45 * 20  # 9 pixels, direction from the random sign
  moved_left = (out[:, 6:11] == 255).all() and (out[:, 11:] == 7).all()
  moved_right = (out[:, :9] == 7).all() and (out[:, 9 + 15:] == 255).all()
  assert shift == 9 and (moved_left or moved_right)


def test_random_erasing_box():
  rng = np.random.default_rng(3)
  for _ in range(20):
    x = np.ones((32, 32, 3), np.float32)
    out = augment.random_erasing(x, rng, prob=1.0)
    zero = (out == 0).all(-1)
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    assert zero.sum() == len(rows) * len(cols) > 0  # one rectangle, all channels
    assert 0.02 * 1024 * 0.5 <= zero.sum() <= 1024 / 3 * 1.5
  assert augment.random_erasing(x, rng, prob=0.0) is x


def test_snn_translate_and_rotate_closed_forms():
  frames = np.random.default_rng(0).random((3, 9, 9, 2)).astype(np.float32)
  shifted = augment.snn_augment_op(frames, 'TranslateX', 2.7, None)  # int(2.7) = 2 px to the right
  np.testing.assert_array_equal(shifted[:, :, 2:], frames[:, :, :-2])
  assert (shifted[:, :, :2] == 0).all()
  down = augment.snn_augment_op(frames, 'TranslateY', -3.0, None)
  np.testing.assert_array_equal(down[:, :-3], frames[:, 3:])
  rotated = augment.snn_augment_op(frames, 'Rotate', 90.0, None)
  np.testing.assert_array_equal(rotated, np.rot90(frames, k=1, axes=(1, 2)))
  np.testing.assert_array_equal(augment.snn_augment_op(frames, 'ShearX', 0.0, None), frames)


def test_snn_augment_is_the_same_for_every_frame_and_seeded():
  frames = np.random.default_rng(1).poisson(1.0, (5, 16, 16, 2)).astype(np.float32)
  for seed in range(12):
    out = augment.snn_augment_wide(frames, np.random.default_rng(seed))
    assert out.shape == frames.shape and out.dtype == np.float32
    for t in range(5):  # the same draws applied to one frame alone give that frame's result
      np.testing.assert_array_equal(out[t], augment.snn_augment_wide(frames[t:t + 1], np.random.default_rng(seed))[0])
    np.testing.assert_array_equal(out, augment.snn_augment_wide(frames, np.random.default_rng(seed)))


def _data_cfg(name, **augment_overrides):
  cfg = ml_collections.ConfigDict(dict(name=name, data_dir='', augment=dict(enabled=True, **augment_overrides)))
  return cfg


@pytest.mark.parametrize('name,shape', [('cifar10_sample', (32, 32, 3)), ('imagenet2012', (300, 260, 3)),
                                        ('digits', (8, 8, 1))])
def test_image_preprocess_shapes_and_determinism(name, shape):
  cfg = _data_cfg(name)
  train, evaluate = pipeline.preprocess_for(cfg, True), pipeline.preprocess_for(cfg, False)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 17 if name == 'digits' else 256, shape, dtype=np.uint8)
  element = {'image': image, 'label': 3}
  size = 224 if name == 'imagenet2012' else shape[0]
  outs = [train.random_map(element, np.random.default_rng(s))['image'] for s in (5, 5, 6, 7, 8)]
  for out in outs:
    assert out.shape == (size, size, shape[-1]) and out.dtype == np.float32
  np.testing.assert_array_equal(outs[0], outs[1])
  if name != 'digits':  # digits have no random augmentation by default
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])
  ev = evaluate.random_map(element, np.random.default_rng(9))
  assert ev['image'].shape == (size, size, shape[-1]) and ev['label'] == 3 and ev['label'].dtype == np.int32
  if name == 'cifar10_sample':
    want = (image / 255.0 - np.array(pipeline.CIFAR_MEAN)) / np.array(pipeline.CIFAR_STD)
    np.testing.assert_allclose(ev['image'], want, rtol=1e-5, atol=1e-5)
  if name == 'digits':
    np.testing.assert_allclose(ev['image'], image / 16.0, rtol=1e-6)


def test_unknown_augment_key_is_an_error():
  with pytest.raises(ValueError, match=r"keys \['colour'\]"):
    pipeline.augment_settings(_data_cfg('cifar10_sample', colour=0.4))
