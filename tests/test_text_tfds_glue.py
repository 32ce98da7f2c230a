"""The TFDS GLUE path on real prepared `glue/<task>` datasets, built here without TensorFlow or network.

TFDS's own `Glue` builder (its configs, feature names, label encoding and TSV parser) prepares RTE
(string labels), MNLI (3 classes, premise/hypothesis, matched/mismatched splits), STS-B (regression),
CoLA (header-less TSV), SST-2 (trailing spaces) and MRPC as ArrayRecord from copies of the staged GLUE
files. Only the download is replaced: the builder's download manager hands it the local copies instead
of the GLUE zips. TFDS builds MRPC not from GLUE's zip but from Microsoft's original files (one
msr_paraphrase_train.txt that holds GLUE's train and dev rows, split by a list of dev sentence-id
pairs); their columns are GLUE's, so they are rebuilt from the staged MRPC train and dev files. The
prepared data is then read through the project's `data.source='tfds'` / 'auto' code path and must give
exactly what the TSV path gives.
"""
import numpy as np
import pytest

from conftest import shared_path
from spikingformer_jax import configs
from spikingformer_jax.text import data, glue

tfds = pytest.importorskip('tensorflow_datasets')
tfds_glue = pytest.importorskip('tensorflow_datasets.text.glue')

TASKS = ('rte', 'mnli', 'stsb', 'cola', 'sst2', 'mrpc')
ROWS = 3000  # every staged file is cut to its first rows to keep the test fast
EVAL_SPLITS = {'mnli': ('validation_matched', 'validation_mismatched')}
# TFDS's MRPC download, {its key: file name}, written under <tsv root>/MSR by _write_msr_files.
MSR_FILES = {'train': 'msr_paraphrase_train.txt', 'dev_ids': 'mrpc_dev_ids.tsv', 'test': 'msr_paraphrase_test.txt'}


class _LocalFiles:
  """Stands in for the download manager: the 'extracted' GLUE zip is a local folder with <TaskDir>/*.tsv,
  and MRPC's original files are <root>/MSR/<name>."""

  def __init__(self, root):
    self.root = str(root)

  def download_and_extract(self, url):
    return self.root

  def download(self, urls):
    return {key: f'{self.root}/MSR/{MSR_FILES[key]}' for key in urls}


class Glue(tfds_glue.Glue, skip_registration=True):
  """TFDS's GLUE builder reading local TSV files. The class name makes the dataset name 'glue', so it
  writes `<data_dir>/glue/<task>/<version>/`, where `tfds.data_source('glue/<task>')` looks."""

  def __init__(self, *, tsv_root, **kwargs):
    self._tsv_root = tsv_root
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    return super()._split_generators(_LocalFiles(self._tsv_root))


def _glue_zip_files(task):
  """{file in the task's GLUE zip: staged file it is made from}. The staged MNLI proxy has one dev file."""
  if task == 'mnli':
    return {'train.tsv': 'train.tsv', 'dev_matched.tsv': 'dev.tsv', 'dev_mismatched.tsv': 'dev.tsv',
            'test_matched.tsv': 'dev.tsv', 'test_mismatched.tsv': 'dev.tsv'}
  if task == 'mrpc':  # TFDS reads the MSR files (_write_msr_files); these are for the TSV path
    return {'train.tsv': 'train.tsv', 'dev.tsv': 'dev.tsv'}
  return {'train.tsv': 'train.tsv', 'dev.tsv': 'dev.tsv', 'test.tsv': 'dev.tsv'}


def _glue_file(lines, task, unlabelled):
  """The first ROWS rows of a staged file; for a GLUE test file, without the label column (as GLUE ships
  them; CoLA's test file has a header and index,sentence columns)."""
  rows = [line.split('\t') for line in lines if line][:ROWS + 1]
  if unlabelled and task == 'cola':
    rows = [['index', 'sentence']] + [[str(i), r[3]] for i, r in enumerate(rows)]
  elif unlabelled:
    label = rows[0].index(glue.get_glue_task(task).label)
    rows = [r[:label] + r[label + 1:] for r in rows]
  return ''.join('\t'.join(r) + '\n' for r in rows)


def _write_msr_files(tsv_root):
  """MRPC as TFDS downloads it, from the staged (GLUE-layout) files written to <tsv_root>/MRPC: the MSR
  training file (BOM, header, GLUE's train rows then its dev rows), the dev id pairs, and a test file."""
  train, dev = ((tsv_root / 'MRPC' / f'{split}.tsv').read_text(encoding='utf-8').lstrip('\ufeff').split('\n')
                for split in ('train', 'dev'))
  header, train_rows, dev_rows = train[0], [r for r in train[1:] if r], [r for r in dev[1:] if r]
  msr = tsv_root / 'MSR'
  msr.mkdir()
  (msr / MSR_FILES['train']).write_text('\ufeff' + '\n'.join([header] + train_rows + dev_rows) + '\n',
                                        encoding='utf-8')
  (msr / MSR_FILES['dev_ids']).write_text(''.join('\t'.join(r.split('\t')[1:3]) + '\n' for r in dev_rows),
                                          encoding='utf-8')
  (msr / MSR_FILES['test']).write_text('\n'.join([header] + dev_rows) + '\n', encoding='utf-8')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(tfds data_dir, TSV root): the TASKS prepared by TFDS's GLUE builder from the TSV files in TSV root."""
  shared = shared_path('data', 'glue')
  tfds.disable_progress_bar()
  tsv_root, data_dir = tmp_path_factory.mktemp('glue_tsv'), tmp_path_factory.mktemp('tfds')
  for task in TASKS:
    task_dir = glue.get_glue_task(task).tsv_dir
    (tsv_root / task_dir).mkdir()
    for name, staged in _glue_zip_files(task).items():
      lines = (shared / task_dir / staged).read_text(encoding='utf-8').split('\n')
      text = _glue_file(lines, task, unlabelled=name.startswith('test'))
      (tsv_root / task_dir / name).write_text(text, encoding='utf-8')
    if task == 'mrpc':
      _write_msr_files(tsv_root)
    Glue(tsv_root=tsv_root, config=task, data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return data_dir, tsv_root


def _cfg(task, data_dir, source):
  c = configs.base_config().data
  c.update(data.text_data_defaults())
  c.name, c.data_dir, c.source, c.max_len = f'glue/{task}', str(data_dir), source, 64
  c.vocab_file = str(shared_path('data', 'vocab', 'bert-base-uncased-vocab.txt'))
  c.train_split, c.eval_split = 'train', EVAL_SPLITS.get(task, ('validation',))[0]
  return c


@pytest.mark.parametrize('task', TASKS)
def test_prepared_tfds_glue_matches_the_tsv_files(prepared, task):
  data_dir, tsv_root = prepared
  spec = glue.get_glue_task(task)
  features = tfds.builder(f'glue/{task}', data_dir=str(data_dir)).info.features  # TFDS's registered builder
  assert set(features) == {*filter(None, spec.tfds_keys), 'label', 'idx'}
  if spec.label_names:
    assert tuple(features['label'].names) == spec.label_names

  for split in ('train',) + EVAL_SPLITS.get(task, ('validation',)):
    from_tfds = glue.read_glue_tfds(task, str(data_dir), split)
    from_tsv = glue.read_glue_tsv(task, str(tsv_root), split)
    assert len(from_tfds) == len(from_tsv) > 200
    assert from_tfds.text_a == from_tsv.text_a and from_tfds.text_b == from_tsv.text_b
    assert from_tfds.labels.dtype == from_tsv.labels.dtype
    np.testing.assert_array_equal(from_tfds.labels, from_tsv.labels)

  # 'auto' picks TFDS: this data_dir holds glue/<task>/, not <TaskDir>/*.tsv.
  tfds_cfg, tsv_cfg = _cfg(task, data_dir, 'auto'), _cfg(task, tsv_root, 'tsv')
  assert data.dataset_info(tfds_cfg) == data.dataset_info(tsv_cfg)
  batches = [list(data.make_loader(c, c.eval_split, batch_size=64, train=False, seed=0)) for c in (tfds_cfg, tsv_cfg)]
  assert len(batches[0]) == len(batches[1])
  for a, b in zip(*batches):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('task,split', [('rte', 'test'), ('stsb', 'test'), ('mnli', 'test_matched'), ('mrpc', 'test')])
def test_unlabelled_tfds_test_split_is_refused(prepared, task, split):
  data_dir, _ = prepared
  with pytest.raises(ValueError, match='no labels'):
    glue.read_glue_tfds(task, str(data_dir), split)
