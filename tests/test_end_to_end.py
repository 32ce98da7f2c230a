"""Real data end to end: small Spikingformers trained briefly on the CIFAR-10 and N-MNIST samples beat chance."""
import jax

from conftest import shared_path
from spikingformer_jax import configs, train


def _config(model, data_name, num_classes, T, steps, batch):
  c = configs.base_config()
  c.model.name = model
  c.model.num_classes = num_classes
  c.model.T = T
  c.model.overrides = {'depth': 1, 'embed_dim': 32, 'num_heads': 2}
  c.data.name = data_name
  c.data.T = T
  c.batch_size = batch
  c.eval_batch_size = 100
  c.total_steps = steps
  c.num_epochs = 1
  c.optim.lr = 3e-3
  c.optim.warmup_epochs = 0
  c.optim.weight_decay = 0.01
  c.optim.per_epoch_schedule = False
  c.label_smoothing = 0.0
  c.mesh.data = 1
  c.progress_bar = False
  c.log_every_steps = 50
  c.checkpoint.async_save = False
  return c


def test_cifar10_sample_beats_chance(tmp_path):
  shared_path('data', 'cifar10', 'train.npz')
  c = _config('spikingformer-cifar-4-384', 'cifar10_sample', 10, 4, steps=200, batch=32)
  c.data.max_eval_examples = 500
  c.data.augment = {'randaug': '', 'reprob': 0.0}  # The plain task, so 300 steps suffice.
  summary = train.train_and_evaluate(c, tmp_path, devices=jax.devices()[:1])
  # 10 balanced classes: chance is 0.10 (500 test images: 0.2 is > 10 standard deviations above it).
  assert summary['final']['top1'] > 0.2, summary


def test_nmnist_sample_beats_chance(tmp_path):
  shared_path('data', 'nmnist', 'train.npz')
  # The CIFAR tokenizer (pooling only in stages 3, 4) keeps 9x9 tokens of the small 34x34 sensor.
  c = _config('spikingformer-cifar-4-384', 'nmnist_sample', 10, 4, steps=300, batch=20)
  summary = train.train_and_evaluate(c, tmp_path, devices=jax.devices()[:1])
  # 50 test recordings, 10 digits: chance is 0.10 (~0.9 is reached here).
  assert summary['final']['top1'] >= 0.5, summary
