"""The reference's augmentations as pure functions of (input, np.random.Generator, settings).

Images (timm's training transform, in its order): crop/resize -> horizontal flip -> RandAugment
(Pillow ops on uint8) -> normalise -> random erasing ('const' mode: zeros in normalised space).
RandAugment follows timm's `rand_augment_transform`: `rand-m9-n1-mstd0.4-inc1` means magnitude 9,
1 op, magnitude ~ N(9, 0.4) clipped to [0, 10] per op call, the "increasing" op list; each chosen op
(drawn with replacement) then fires with probability 0.5.

Event frames `[T, H, W, C]` (the reference's DVS transform): horizontal flip, then `SNNAugmentWide`:
one of identity / shearX / translateX / translateY / rotate / cutout, magnitude from 31 bins and a
random sign, nearest-neighbour sampling about the image centre, fill 0, the same geometry for every
frame and channel.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# --- RandAugment (timm) --------------------------------------------------------------------------

LEVEL_DENOM = 10.0
INTERPOLATIONS = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}

RAND_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                   'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                   'TranslateXRel', 'TranslateYRel')
RAND_INCREASING_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                              'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                              'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                              'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  magnitude: float = 10.0
  num_ops: int = 2
  magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
  magnitude_max: float = LEVEL_DENOM
  ops: tuple[str, ...] = RAND_TRANSFORMS


def parse_randaug(config: str) -> RandAugmentSpec:
  """Parses timm's 'rand-m9-n2-mstd0.5-inc1[-mmax10]' strings (defaults m10, n2, mstd0)."""
  sections = config.split('-')
  if sections[0] != 'rand':
    raise ValueError(f'RandAugment config {config!r}: expected it to start with "rand-".')
  values = {}
  for section in sections[1:]:
    match = re.fullmatch(r'([a-z]+)(\d.*)', section)
    if not match or match.group(1) not in ('m', 'n', 'mstd', 'mmax', 'inc'):
      raise ValueError(f'RandAugment config {config!r}: unknown section {section!r}; expected '
                       'm<int>, n<int>, mstd<float>, mmax<int>, inc<0|1>.')
    values[match.group(1)] = match.group(2)
  mstd = float(values.get('mstd', 0.0))
  return RandAugmentSpec(
      magnitude=float(int(values.get('m', 10))),
      num_ops=int(values.get('n', 2)),
      magnitude_std=math.inf if mstd > 100 else mstd,
      magnitude_max=float(int(values['mmax'])) if 'mmax' in values else LEVEL_DENOM,
      ops=RAND_INCREASING_TRANSFORMS if int(values.get('inc', 0)) else RAND_TRANSFORMS)


def _signed(value, rng):
  return -value if rng.random() > 0.5 else value


def _enhance_factor(name, level, rng):
  if name.endswith('Increasing'):
    return max(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, rng))
  return level / LEVEL_DENOM * 1.8 + 0.1


def _affine(img, matrix, interpolation, fill):
  return img.transform(img.size, Image.AFFINE, matrix, resample=interpolation, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def apply_op(img: Image.Image, name: str, level: float, rng, interpolation, fill) -> Image.Image:
  """One timm RandAugment op at `level` in [0, 10] (random signs drawn from `rng`)."""
  base = name.removesuffix('Increasing')
  if name == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if name == 'Equalize':
    return ImageOps.equalize(img)
  if name == 'Invert':
    return ImageOps.invert(img)
  if name == 'Rotate':
    return img.rotate(_signed(level / LEVEL_DENOM * 30.0, rng), resample=interpolation, fillcolor=fill)
  if base == 'Posterize':
    bits = int(level / LEVEL_DENOM * 4)
    bits = 4 - bits if name == 'PosterizeIncreasing' else bits
    return img if bits >= 8 else ImageOps.posterize(img, bits)
  if base == 'Solarize':
    thresh = int(level / LEVEL_DENOM * 256)
    return ImageOps.solarize(img, 256 - thresh if name == 'SolarizeIncreasing' else thresh)
  if name == 'SolarizeAdd':
    return _solarize_add(img, int(level / LEVEL_DENOM * 110))
  if base in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return getattr(ImageEnhance, base)(img).enhance(_enhance_factor(name, level, rng))
  if name == 'ShearX':
    return _affine(img, (1, _signed(level / LEVEL_DENOM * 0.3, rng), 0, 0, 1, 0), interpolation, fill)
  if name == 'ShearY':
    return _affine(img, (1, 0, 0, _signed(level / LEVEL_DENOM * 0.3, rng), 1, 0), interpolation, fill)
  if name == 'TranslateXRel':
    pixels = _signed(level / LEVEL_DENOM * 0.45, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), interpolation, fill)
  if name == 'TranslateYRel':
    pixels = _signed(level / LEVEL_DENOM * 0.45, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels), interpolation, fill)
  raise ValueError(f'Unknown RandAugment op {name!r}; expected one of {RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS}.')


def rand_augment(img: Image.Image, rng: np.random.Generator, spec: RandAugmentSpec,
                 interpolation=Image.BICUBIC, fill=(128, 128, 128)) -> Image.Image:
  if img.mode == 'L':
    fill = fill[0] if isinstance(fill, tuple) else fill
  for op_index in rng.integers(0, len(spec.ops), size=spec.num_ops):
    if rng.random() > 0.5:  # timm's AugmentOp prob=0.5
      continue
    level = spec.magnitude
    if spec.magnitude_std == math.inf:
      level = rng.uniform(0, level)
    elif spec.magnitude_std > 0:
      level = rng.normal(level, spec.magnitude_std)
    level = max(0.0, min(level, spec.magnitude_max))
    img = apply_op(img, spec.ops[op_index], level, rng, interpolation, fill)
  return img


# --- Image geometry, normalisation, random erasing -------------------------------------------------

def center_square_resize(img: Image.Image, size: int, interpolation=Image.BICUBIC) -> Image.Image:
  """timm's RandomResizedCrop with scale=ratio=(1, 1): the centred square of the shorter side."""
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  img = img.crop((left, top, left + side, top + side))
  return img if side == size else img.resize((size, size), interpolation)


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 1.0,
                       interpolation=Image.BICUBIC) -> Image.Image:
  """timm's eval transform: shorter side to size / crop_pct, then a centred size x size crop."""
  w, h = img.size
  short = int(size / crop_pct)
  if (w <= h and w != short) or (h < w and h != short):
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((new_w, new_h), interpolation)
    w, h = new_w, new_h
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def normalize(image: np.ndarray, mean, std, pixel_max: float) -> np.ndarray:
  x = image.astype(np.float32) / np.float32(pixel_max)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def erase_box(rng, height, width, min_area, max_area, log_ratio):
  """torchvision/timm box sampling: 10 tries of (area fraction, aspect); None if none fits."""
  for _ in range(10):
    area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_ratio))
    h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return None


def random_erasing(x: np.ndarray, rng, prob=0.25, min_area=0.02, max_area=1 / 3,
                   min_aspect=0.3) -> np.ndarray:
  """timm RandomErasing, mode 'const', one box: zeros over all channels of `x` [..., H, W, C]."""
  if rng.random() > prob:
    return x
  box = erase_box(rng, x.shape[-3], x.shape[-2], min_area, max_area,
                  (math.log(min_aspect), math.log(1 / min_aspect)))
  if box is not None:
    top, left, h, w = box
    x = x.copy()
    x[..., top:top + h, left:left + w, :] = 0
  return x


# --- SNNAugmentWide for event frames ---------------------------------------------------------------

SNN_AUGMENT_OPS = ('Identity', 'ShearX', 'TranslateX', 'TranslateY', 'Rotate', 'Cutout')
SNN_AUGMENT_RANGES = {'ShearX': 0.3, 'TranslateX': 5.0, 'TranslateY': 5.0, 'Rotate': 30.0}


def _resample_nearest(frames: np.ndarray, inverse: np.ndarray, shift=(0.0, 0.0)) -> np.ndarray:
  """out[p] = in[M (p - c - shift) + c], p = (x, y), c the centre; nearest (ties to even), zeros outside.

  `inverse` maps output to source coordinates, as torchvision's inverse affine matrix does.
  """
  h, w = frames.shape[-3], frames.shape[-2]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing='ij')
  xs, ys = xs - shift[0], ys - shift[1]
  src_x = np.rint(inverse[0, 0] * xs + inverse[0, 1] * ys + cx).astype(np.int64)
  src_y = np.rint(inverse[1, 0] * xs + inverse[1, 1] * ys + cy).astype(np.int64)
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  out = frames[..., np.clip(src_y, 0, h - 1), np.clip(src_x, 0, w - 1), :]
  return out * inside[:, :, None].astype(frames.dtype)


def snn_augment_op(frames: np.ndarray, name: str, magnitude: float, rng) -> np.ndarray:
  """One SNNAugmentWide op (torchvision tensor semantics) on frames [..., H, W, C]."""
  if name == 'Identity':
    return frames
  if name == 'ShearX':  # torchvision affine(shear=degrees(m)): source x = x + tan(m) * y.
    return _resample_nearest(frames, np.array([[1.0, math.tan(magnitude)], [0.0, 1.0]]))
  if name in ('TranslateX', 'TranslateY'):
    shift = (int(magnitude), 0) if name == 'TranslateX' else (0, int(magnitude))
    return _resample_nearest(frames, np.eye(2), shift)
  if name == 'Rotate':  # torchvision rotate(angle): counter-clockwise on screen (np.rot90 at 90).
    a = math.radians(-magnitude)
    return _resample_nearest(frames, np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]))
  if name == 'Cutout':  # RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1)), value 0.
    box = erase_box(rng, frames.shape[-3], frames.shape[-2], 0.001, 0.11, (0.0, 0.0))
    if box is None:
      return frames
    top, left, h, w = box
    frames = frames.copy()
    frames[..., top:top + h, left:left + w, :] = 0
    return frames
  raise ValueError(f'Unknown SNNAugmentWide op {name!r}; expected one of {SNN_AUGMENT_OPS}.')


def snn_augment_wide(frames: np.ndarray, rng: np.random.Generator, num_bins: int = 31) -> np.ndarray:
  name = SNN_AUGMENT_OPS[int(rng.integers(len(SNN_AUGMENT_OPS)))]
  magnitude = 0.0
  if name in SNN_AUGMENT_RANGES:
    bound = SNN_AUGMENT_RANGES[name]
    magnitude = float(np.linspace(-bound, bound, num_bins)[rng.integers(num_bins)])
    if rng.integers(2):
      magnitude = -magnitude
  return snn_augment_op(frames, name, magnitude, rng)


def hflip(x: np.ndarray) -> np.ndarray:
  """Mirror the width axis of [..., H, W, C]."""
  return x[..., ::-1, :]
