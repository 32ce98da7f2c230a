"""Loaders: per-process sharding, exact resumption, eval padding/masks, sources' errors, prepare."""
import json

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import shared_path

from spikingformer_jax import configs
from spikingformer_jax import data
from spikingformer_jax.data import batching, prepare, sources
from test_data_events import write_aedat31, write_cifar10_dvs

N = 60


@pytest.fixture
def indexed_npz(tmp_path):
  """An npz dataset whose pixel values spell the example index: image = index / 255 after the loader."""
  for split, n in (('train', N), ('test', 23)):
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    np.savez(tmp_path / f'{split}.npz', images=images, labels=np.arange(n) % 5)
  return tmp_path


def npz_cfg(path, **extra):
  cfg = configs.base_config().data
  cfg.name, cfg.data_dir = 'npz', str(path)
  cfg.augment = ml_collections.ConfigDict(dict(enabled=False, mean=[0.0], std=[1.0]))
  for k, v in extra.items():
    cfg[k] = v
  return cfg


def ids(batch):
  return np.rint(batch['image'][:, 0, 0, 0] * 255).astype(int)


def test_two_processes_get_disjoint_halves_of_the_one_process_batches(indexed_npz):
  cfg = npz_cfg(indexed_npz, augment=ml_collections.ConfigDict(dict(enabled=True, randaug='rand-m9-n1-mstd0.4-inc1',
                                                                     hflip=0.5, mean=[0.0], std=[1.0])))
  load = lambda process, count: list(data.make_loader(cfg, 'train', batch_size=10, train=True, seed=3,
                                                      process_index=process, process_count=count, num_epochs=1))
  single, halves = load(0, 1), [load(0, 2), load(1, 2)]
  assert len(single) == len(halves[0]) == len(halves[1]) == N // 10
  for whole, first, second in zip(single, *halves):
    assert first['image'].shape == second['image'].shape == (5, 4, 4, 3)
    # The same global batch, augmentations included, whatever the process count.
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
  # Each process reads its own rows: disjoint, together every example once per epoch.
  plain = npz_cfg(indexed_npz)
  shards = [np.concatenate([ids(b) for b in data.make_loader(plain, 'train', batch_size=10, train=True, seed=3,
                                                             process_index=p, process_count=2, num_epochs=1)])
            for p in range(2)]
  for shard in shards:
    assert len(shard) == N // 2
  assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(N))
  assert not np.array_equal(np.sort(shards[0]), shards[0])  # shuffled


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_batches_concatenate_to_the_global_batches(process_count):
  stream = grain.MapDataset.range(40)  # 40 records: 3 global batches of 12, the incomplete 4th dropped
  split = [list(batching.process_batches(stream, batch_size=12, process_index=p, process_count=process_count))
           for p in range(process_count)]
  whole = list(batching.process_batches(stream, batch_size=12, process_index=0, process_count=1))
  assert len(whole) == 3 and all(len(s) == 3 for s in split)
  for g, batch in enumerate(whole):
    np.testing.assert_array_equal(batch, np.arange(12 * g, 12 * g + 12))
    np.testing.assert_array_equal(np.concatenate([s[g] for s in split]), batch)


def test_eval_padding_repeats_the_first_records_with_mask_0():
  padded = batching.epochs(grain.MapDataset.range(3).map(lambda i: {'id': i}), train=False, seed=0,
                           num_epochs=None, batch_size=8)
  assert [(e['id'], e['mask']) for e in padded] == [(0, 1), (1, 1), (2, 1), (0, 0), (1, 0), (2, 0), (0, 0), (1, 0)]
  assert {type(e['mask']) for e in padded} == {np.float32}


def test_max_examples_takes_the_first_records(indexed_npz):
  cfg = npz_cfg(indexed_npz, max_train_examples=24, max_eval_examples=5)
  info = data.dataset_info(cfg)
  assert (info.num_train, info.num_eval) == (24, 5)
  seen = np.concatenate([ids(b) for b in data.make_loader(cfg, 'train', batch_size=8, train=True, seed=0,
                                                           num_epochs=2)])
  assert len(seen) == 48 and sorted(seen[:24]) == sorted(seen[24:]) == list(range(24))
  evaluation = list(data.make_loader(cfg, 'test', batch_size=4, train=False, seed=0))
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in evaluation]), [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(np.concatenate([ids(b) for b in evaluation]), [0, 1, 2, 3, 4, 0, 1, 2])


def test_epochs_reshuffle_and_seed_fixes_order(indexed_npz):
  cfg = npz_cfg(indexed_npz)
  run = lambda seed: np.concatenate([ids(b) for b in data.make_loader(
      cfg, 'train', batch_size=12, train=True, seed=seed, num_epochs=2)])
  first = run(7)
  np.testing.assert_array_equal(first, run(7))
  assert not np.array_equal(first, run(8))
  assert sorted(first[:N]) == list(range(N)) and not np.array_equal(first[:N], first[N:])


def test_state_round_trip_resumes_at_the_same_batch(indexed_npz):
  cfg = npz_cfg(indexed_npz, augment=ml_collections.ConfigDict(dict(enabled=True, randaug='rand-m9-n1-mstd0.4-inc1')))
  loader = data.make_loader(cfg, 'train', batch_size=6, train=True, seed=1, num_epochs=None)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(12)]  # crosses the epoch boundary (10 batches per epoch)
  resumed = iter(data.make_loader(cfg, 'train', batch_size=6, train=True, seed=1, num_epochs=None))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def orbax_round_trip(tmp_path, make_loader, skip=3, check=12):
  """Saves an iterator after `skip` batches with grain's Orbax handler (as checkpoint.py does), restores it
  into a new loader's iterator and asserts that both then give the same `check` batches."""
  it = iter(make_loader())
  for _ in range(skip):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data_iter',)) as manager:
    manager.save(skip, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(check)]
    resumed = iter(make_loader())
    manager.restore(skip, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize('workers', [0, 1])
def test_orbax_restores_the_iterator_exactly(indexed_npz, tmp_path, workers):
  cfg = npz_cfg(indexed_npz, num_workers=workers,
                augment=ml_collections.ConfigDict(dict(enabled=True, randaug='rand-m9-n1-mstd0.4-inc1', hflip=0.5)))
  # Process 1 of 2, 5 batches of 3 rows per epoch: the 12 batches checked cross two epoch boundaries.
  orbax_round_trip(tmp_path, lambda: data.make_loader(cfg, 'train', batch_size=6, train=True, seed=5,
                                                      process_index=1, process_count=2))


def test_worker_processes_give_the_same_batches(indexed_npz):
  batches = {}
  for workers in (0, 1):
    cfg = npz_cfg(indexed_npz, num_workers=workers,
                  augment=ml_collections.ConfigDict(dict(enabled=True, randaug='rand-m9-n1-mstd0.4-inc1',
                                                         hflip=0.5, reprob=0.25)))
    batches[workers] = list(data.make_loader(cfg, 'train', batch_size=12, train=True, seed=4, num_epochs=1))
  assert len(batches[0]) == len(batches[1]) == N // 12
  for a, b in zip(batches[0], batches[1]):
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('processes', [1, 2])
def test_eval_covers_every_example_once(indexed_npz, processes):
  cfg = npz_cfg(indexed_npz)
  real, sizes = [], set()
  for process in range(processes):
    batches = list(data.make_loader(cfg, 'test', batch_size=8, train=False, seed=0,
                                    process_index=process, process_count=processes))
    assert len(batches) == 3  # 23 examples padded to 24: 3 batches of 8, or on each of 2 processes 3 of 4
    for b in batches:
      sizes.add(b['mask'].shape)
      assert b['mask'].dtype == np.float32
      real.extend(ids(b)[b['mask'] == 1])
  assert sizes == {(8 // processes,)}
  assert sorted(real) == list(range(23))


def test_dataset_info(indexed_npz):
  info = data.dataset_info(npz_cfg(indexed_npz))
  assert info == data.DatasetInfo(num_classes=5, example_shape=(4, 4, 3), num_train=N, num_eval=23)
  cfg = configs.base_config().data
  cfg.name, cfg.max_train_examples = 'nmnist_sample', 40
  cfg.T = 8
  shared_path('data', 'nmnist')
  assert data.dataset_info(cfg) == data.DatasetInfo(10, (8, 34, 34, 2), 40, 50)


def test_real_samples_load():
  shared_path('data', 'cifar10')
  cfg = configs.base_config().data
  cfg.name = 'cifar10_sample'
  batch = next(iter(data.make_loader(cfg, 'train', batch_size=16, train=True, seed=0)))
  assert batch['image'].shape == (16, 32, 32, 3) and abs(batch['image'].mean()) < 1.0
  cfg.name, cfg.T = 'nmnist_sample', 10
  batch = next(iter(data.make_loader(cfg, 'test', batch_size=4, train=False, seed=0)))
  assert batch['image'].shape == (4, 10, 34, 34, 2) and batch['image'].dtype == np.float32
  staged = np.load(shared_path('data', 'nmnist', 'test.npz'))
  np.testing.assert_array_equal(batch['image'].sum(axis=(1, 2, 3, 4)), np.diff(staged['offsets'])[:4])


def test_tfds_source_through_data_source():
  import tensorflow_datasets as tfds
  cfg = configs.base_config().data
  cfg.name = 'cifar10'
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.example_shape, info.num_train) == (10, (32, 32, 3), 12)
    batch = next(iter(data.make_loader(cfg, 'test', batch_size=8, train=False, seed=0)))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['mask'].sum() == 8


def test_bad_inputs_name_the_file(tmp_path, indexed_npz):
  with pytest.raises(sources.DataError, match=r'missing.*does not exist'):
    data.dataset_info(npz_cfg(tmp_path / 'missing'))
  bad = tmp_path / 'bad'
  bad.mkdir()
  np.savez(bad / 'train.npz', images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.array([0, 1, 7]))
  np.savez(bad / 'test.npz', images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]))
  cfg = npz_cfg(bad, num_classes=5)
  with pytest.raises(sources.DataError, match=r'train\.npz: label 7 \(example 2\) is out of range; expected 0\.\.4'):
    data.make_loader(cfg, 'train', batch_size=1, train=True, seed=0)
  with pytest.raises(sources.DataError, match=r'test\.npz: images have shape \(3, 4, 4\).*expected uint8 \[N, H, W, C\]'):
    data.make_loader(cfg, 'test', batch_size=1, train=False, seed=0)
  (bad / 'test.npz').write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(sources.DataError, match=r'test\.npz: not a readable \.npz'):
    data.make_loader(cfg, 'test', batch_size=1, train=False, seed=0)
  dvs = configs.base_config().data
  dvs.name = 'cifar11'
  with pytest.raises(ValueError, match="config.data.name = 'cifar11'"):
    data.dataset_info(dvs)
  dvs.name, dvs.data_dir = 'dvs128_gesture', str(tmp_path)
  with pytest.raises(sources.DataError, match=r'index\.json does not exist.*prepare --dataset=dvs128_gesture'):
    data.dataset_info(dvs)


def test_train_and_eval_images_of_different_shapes_are_an_error(tmp_path):
  for split, size in (('train', 8), ('test', 16)):
    np.savez(tmp_path / f'{split}.npz', images=np.zeros((4, size, size, 1), np.uint8), labels=np.arange(4))
  with pytest.raises(sources.DataError, match=r"'train' examples are shaped \(8, 8, 1\) but the 'test' ones "
                                              r"\(16, 16, 1\)"):
    data.dataset_info(npz_cfg(tmp_path))
  resized = npz_cfg(tmp_path)
  resized.augment.image_size = 8
  assert data.dataset_info(resized).example_shape == (8, 8, 1)


def make_gesture_raw(root):
  rng = np.random.default_rng(0)
  trials = {'train': ['user01_led.aedat', 'user02_lab.aedat'], 'test': ['user24_led.aedat']}
  for split, names in trials.items():
    (root / f'trials_to_{split}.txt').write_text('\n'.join(names) + '\n')
    for name in names:
      t = np.sort(rng.integers(0, 3000, 400))
      evs = list(zip(rng.integers(0, 128, 400), rng.integers(0, 128, 400), rng.integers(0, 2, 400), t,
                     np.ones(400, int)))
      write_aedat31(root / name, [(1, 0, [tuple(int(v) for v in e) for e in evs])])
      (root / name.replace('.aedat', '_labels.csv')).write_text(
          'class,startTime_usec,endTime_usec\n1,0,1000\n5,1000,2500\n11,2500,2999\n')


def test_prepare_gesture_then_load(tmp_path):
  raw, out = tmp_path / 'DvsGesture', tmp_path / 'frames'
  raw.mkdir()
  make_gesture_raw(raw)
  prepare.main(['--dataset=dvs128_gesture', f'--raw_dir={raw}', f'--out_dir={out}', '--T=4', '--shard_size=2'])
  index = json.loads((out / 'train-T4-number' / 'index.json').read_text())
  assert index['num_examples'] == 6 and [s['count'] for s in index['shards']] == [2, 2, 2]
  cfg = configs.base_config().data
  cfg.name, cfg.data_dir, cfg.T = 'dvs128_gesture', str(out), 4
  assert data.dataset_info(cfg) == data.DatasetInfo(11, (4, 128, 128, 2), 6, 3)
  batch = next(iter(data.make_loader(cfg, 'test', batch_size=4, train=False, seed=0)))
  np.testing.assert_array_equal(batch['label'][:3], [0, 4, 10])
  np.testing.assert_array_equal(batch['mask'], [1, 1, 1, 0])
  # the first test example is user24's first gesture: its events with 0 <= t < 1000, integrated directly
  from spikingformer_jax.data import events, frames
  ev, _ = events.split_gesture_trial(events.read_aedat31(raw / 'user24_led.aedat'),
                                     events.read_gesture_labels(raw / 'user24_led_labels.csv'))[0]
  np.testing.assert_array_equal(batch['image'][0], frames.integrate(ev, 4, 128, 128))
  train = next(iter(data.make_loader(cfg, 'train', batch_size=3, train=True, seed=0)))
  assert train['image'].shape == (3, 4, 128, 128, 2) and train['image'].dtype == np.float32
  shard = out / 'test-T4-number' / 'shard-00000.npz'
  shard.write_bytes(shard.read_bytes()[:200])
  with pytest.raises(sources.DataError, match=r'shard-00000\.npz'):
    next(iter(data.make_loader(cfg, 'test', batch_size=4, train=False, seed=0)))


def test_prepare_cifar10_dvs_split_is_first_90_percent_per_class(tmp_path):
  for cls in prepare.CIFAR10_CLASSES:
    (tmp_path / cls).mkdir()
    for i in range(11):
      write_cifar10_dvs(tmp_path / cls / f'cifar10_{cls}_{i}.aedat', [i % 128], [1], [0], [5])
  test_files = prepare.cifar10_dvs_files(tmp_path, 'test')
  assert len(prepare.cifar10_dvs_files(tmp_path, 'train')) == 100  # ceil(0.9 * 11) = 10 per class
  # sorted by name, as the reference's DatasetFolder: ..._0, _1, _10, _2, ..., _9 -> the last is _9
  assert [p.name for p, _ in test_files[:1]] == ['cifar10_airplane_9.aedat']
  assert [label for _, label in test_files] == list(range(10))


def test_digits_split_is_fixed_stratified_and_disjoint():
  train, test = sources.load_digits_split('train'), sources.load_digits_split('test')
  assert (len(train), len(test)) == (1437, 360)
  assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 1) and train.images.max() == 16
  pairs = lambda s: {(img.tobytes(), lab) for img, lab in zip(s.images, s.labels)}
  assert len(pairs(train) & pairs(test)) <= 5  # only images that occur twice in load_digits can repeat
  np.testing.assert_allclose(np.bincount(test.labels) / 360, np.bincount(train.labels) / 1437, atol=0.01)
  np.testing.assert_array_equal(test.labels, sources.load_digits_split('test').labels)


def test_raw_nmnist_layout_through_the_loader(tmp_path):
  raw = shared_path('data', 'nmnist', 'raw_bin')
  for name, label in (line.split(',') for line in (raw / 'labels.csv').read_text().split()[1:]):
    (tmp_path / 'Test' / label).mkdir(parents=True)
    (tmp_path / 'Test' / label / name).write_bytes((raw / name).read_bytes())
  cfg = configs.base_config().data
  cfg.name, cfg.data_dir, cfg.T = 'nmnist', str(tmp_path), 6
  batches = list(data.make_loader(cfg, 'test', batch_size=4, train=False, seed=0))
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(10))
  sizes = {label: (raw / name).stat().st_size // 5
           for name, label in (line.split(',') for line in (raw / 'labels.csv').read_text().split()[1:])}
  counts = np.concatenate([b['image'][b['mask'] == 1].sum(axis=(1, 2, 3, 4)) for b in batches])
  np.testing.assert_array_equal(counts, [sizes[str(d)] for d in range(10)])
