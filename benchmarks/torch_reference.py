"""A PyTorch Spikingformer (CIFAR tokenizer) written from the reference's cifar10/model.py, for timing.

It reproduces the reference's computation, layouts (`[T, B, C, H, W]`, Conv1d/Conv2d/BatchNorm on the
flattened `[T*B, ...]` batch) and state_dict names (`patch_embed.block{k}_{conv,bn}`, `block.{i}.attn.*`,
`block.{i}.mlp.mlp{1,2}_*`, `head`, plus the unused `norm1`/`norm2` LayerNorms), so the reference's
training step can be timed beside ours and its weights loaded strictly.

The neuron is either SpikingJelly 0.0.0.0.14's `clock_driven.neuron.MultiStepLIFNode(backend='torch')`
(what the reference runs on CPU; `lif='spikingjelly'`) or `TorchLIF` below, a self-contained
multi-step LIF with the same equations and sigmoid surrogate (`lif='builtin'`), so this module also
works where spikingjelly is not installed (e.g. the main venv's parity test).
"""
from __future__ import annotations

import torch
from torch import nn


class _SigmoidSpike(torch.autograd.Function):
  """Heaviside(x) (1 where x >= 0) with the derivative alpha * sigmoid(alpha x) (1 - sigmoid(alpha x))."""

  @staticmethod
  def forward(ctx, x, alpha):
    ctx.save_for_backward(x)
    ctx.alpha = alpha
    return (x >= 0).to(x.dtype)

  @staticmethod
  def backward(ctx, grad):
    (x,) = ctx.saved_tensors
    sg = torch.sigmoid(ctx.alpha * x)
    return grad * ctx.alpha * sg * (1.0 - sg), None


class TorchLIF(nn.Module):
  """Multi-step LIF over the leading T axis: decay_input, hard reset to 0, detached reset spike."""

  def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0):
    super().__init__()
    self.decay, self.v_threshold, self.alpha = 1.0 / tau, v_threshold, alpha

  def forward(self, x):
    v = torch.zeros_like(x[0])
    spikes = []
    for x_t in x:
      h = v + (x_t - v) * self.decay
      s = _SigmoidSpike.apply(h - self.v_threshold, self.alpha)
      v = h * (1.0 - s.detach())
      spikes.append(s)
    return torch.stack(spikes)


def make_lif(kind: str, tau: float, v_threshold: float = 1.0) -> nn.Module:
  if kind == 'builtin':
    return TorchLIF(tau, v_threshold)
  if kind == 'spikingjelly':
    from spikingjelly.clock_driven import neuron
    return neuron.MultiStepLIFNode(tau=tau, v_threshold=v_threshold, detach_reset=True, backend='torch')
  raise ValueError(f"Unknown LIF kind {kind!r}; expected 'builtin' or 'spikingjelly'.")


def _flat(module, x):
  """Applies `module` to `[T*B, ...]` and restores `[T, B, ...]`."""
  t, b = x.shape[:2]
  y = module(x.flatten(0, 1))
  return y.reshape(t, b, *y.shape[1:])


class Tokenizer(nn.Module):
  """CIFAR stem: Conv-BN, then LIF-[MaxPool]-Conv-BN x4 with pools in stages 3 and 4; channels D/8..D."""

  def __init__(self, in_channels: int, dim: int, tau: float, lif: str):
    super().__init__()
    widths = (in_channels, dim // 8, dim // 4, dim // 2, dim, dim)
    for k in range(5):
      setattr(self, f'block{k}_conv', nn.Conv2d(widths[k], widths[k + 1], 3, 1, 1, bias=False))
      setattr(self, f'block{k}_bn', nn.BatchNorm2d(widths[k + 1]))
      if k:
        setattr(self, f'block{k}_lif', make_lif(lif, tau))
    self.pool = nn.MaxPool2d(3, 2, 1)

  def forward(self, x):
    x = _flat(lambda y: self.block0_bn(self.block0_conv(y)), x)
    for k in range(1, 5):
      x = getattr(self, f'block{k}_lif')(x)
      conv, bn = getattr(self, f'block{k}_conv'), getattr(self, f'block{k}_bn')
      pool = self.pool if k >= 3 else nn.Identity()
      x = _flat(lambda y: bn(conv(pool(y))), x)
    return x


class SpikingSelfAttention(nn.Module):
  def __init__(self, dim: int, heads: int, tau: float, lif: str):
    super().__init__()
    self.heads = heads
    self.proj_lif = make_lif(lif, tau)
    for name in ('q', 'k', 'v'):
      setattr(self, f'{name}_conv', nn.Conv1d(dim, dim, 1, bias=False))
      setattr(self, f'{name}_bn', nn.BatchNorm1d(dim))
      setattr(self, f'{name}_lif', make_lif(lif, tau))
    self.attn_lif = make_lif(lif, tau, v_threshold=0.5)
    self.proj_conv = nn.Conv1d(dim, dim, 1)
    self.proj_bn = nn.BatchNorm1d(dim)

  def forward(self, x):
    t, b, c, h, w = x.shape
    x = self.proj_lif(x).flatten(3)  # [T, B, C, N]
    n, d = h * w, c // self.heads

    def branch(name):
      conv, bn = getattr(self, f'{name}_conv'), getattr(self, f'{name}_bn')
      y = getattr(self, f'{name}_lif')(_flat(lambda z: bn(conv(z)), x))
      return y.transpose(-1, -2).reshape(t, b, n, self.heads, d).permute(0, 1, 3, 2, 4)  # [T,B,heads,N,d]

    q, k, v = branch('q'), branch('k'), branch('v')
    y = ((q @ k.transpose(-2, -1)) @ v) * 0.125
    y = self.attn_lif(y.transpose(3, 4).reshape(t, b, c, n))
    y = _flat(lambda z: self.proj_bn(self.proj_conv(z)), y)
    return y.reshape(t, b, c, h, w)


class MLP(nn.Module):
  def __init__(self, dim: int, hidden: int, tau: float, lif: str):
    super().__init__()
    self.mlp1_lif, self.mlp2_lif = make_lif(lif, tau), make_lif(lif, tau)
    self.mlp1_conv, self.mlp1_bn = nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden)
    self.mlp2_conv, self.mlp2_bn = nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim)

  def forward(self, x):
    x = _flat(lambda y: self.mlp1_bn(self.mlp1_conv(y)), self.mlp1_lif(x))
    return _flat(lambda y: self.mlp2_bn(self.mlp2_conv(y)), self.mlp2_lif(x))


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float, tau: float, lif: str):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)  # Constructed but never applied, as in the reference.
    self.attn = SpikingSelfAttention(dim, heads, tau, lif)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = MLP(dim, int(dim * mlp_ratio), tau, lif)

  def forward(self, x):
    x = x + self.attn(x)
    return x + self.mlp(x)


class Spikingformer(nn.Module):
  """Images `[B, C, H, W]` -> logits `[B, num_classes]`, repeating the image over T steps."""

  def __init__(self, num_classes: int = 10, dim: int = 384, depth: int = 4, heads: int = 12,
               mlp_ratio: float = 4.0, T: int = 4, tau: float = 2.0, in_channels: int = 3,
               lif: str = 'builtin'):
    super().__init__()
    self.T, self.lif_kind = T, lif
    self.patch_embed = Tokenizer(in_channels, dim, tau, lif)
    self.block = nn.ModuleList(Block(dim, heads, mlp_ratio, tau, lif) for _ in range(depth))
    self.head = nn.Linear(dim, num_classes)

  def forward(self, images):
    x = images.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
    x = self.patch_embed(x)
    for block in self.block:
      x = block(x)
    logits = self.head(x.flatten(3).mean(3).mean(0))
    if self.lif_kind == 'spikingjelly':  # SpikingJelly neurons keep their membrane between calls.
      from spikingjelly.clock_driven import functional
      functional.reset_net(self)
    return logits


def cifar_4_384(lif: str = 'builtin') -> Spikingformer:
  """The reference's CIFAR10 model (cifar10.yml): 4 blocks, dim 384, 12 heads, T=4."""
  return Spikingformer(num_classes=10, dim=384, depth=4, heads=12, T=4, lif=lif)
