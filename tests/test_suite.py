"""The benchmark suite: 13 benchmarks, smoke and cpu-budget runs end to end, missing data and failures reported."""
import dataclasses
import json

import jax
import pytest

from conftest import shared_path
from spikingformer_jax import configs, suite


def test_the_suite_covers_the_papers_13_benchmarks_with_reported_numbers():
  names = [b.name for b in suite.BENCHMARKS]
  assert len(names) == len(set(names)) == 13
  glue = {n for n in names if n.startswith('glue_')}
  assert glue == {f'glue_{t}' for t in ('mnli', 'qqp', 'qnli', 'sst2', 'cola', 'stsb', 'mrpc', 'rte')}
  paper = {b.name: b.paper for b in suite.BENCHMARKS}
  assert (paper['imagenet'], paper['cifar10'], paper['cifar100'], paper['cifar10_dvs'],
          paper['dvs128_gesture']) == (75.85, 95.81, 79.21, 81.3, 98.3)  # the reference README
  assert all(paper[n] is None for n in glue)  # none published: shown as '—'
  for bench in suite.BENCHMARKS:  # every config loads and validates in every budget
    for budget in suite.BUDGETS:
      suite.build_config(bench, budget, minutes=1.0)
  cpu = {b.name: suite.build_config(b, 'cpu', minutes=2.5) for b in suite.benchmarks('cpu')}
  assert {n for n, c in cpu.items() if c is None} == {'cifar100', 'cifar10_dvs', 'dvs128_gesture'}  # no samples
  assert {'nmnist', 'sst2_sentence', 'sst5', 'mr', 'subj', 'chnsenticorp', 'waimai'} <= set(cpu)
  for name, config in cpu.items():
    if config is not None:
      configs.validate(config)
      assert config.time_budget_minutes == 2.5, name
  assert (cpu['glue_qnli'].data.train_split, cpu['glue_qnli'].data.eval_split) == ('validation[:80%]',
                                                                                   'validation[80%:]')
  assert cpu['cifar10'].data.name == 'cifar10_sample' and cpu['glue_rte'].model.name == 'spikingformer-text-tiny'


def test_smoke_subset_runs_and_writes_the_tables(tmp_path):
  shared_path('data', 'glue', 'RTE', 'train.tsv')
  rows = suite.run_suite('smoke', tmp_path, ['cifar100', 'glue_rte'], devices=jax.devices()[:1], log=lambda _: None)
  cifar100, rte = rows
  for row in rows:
    assert row['status'] == 'ok', row.get('traceback')
    assert row['steps'] == row['total_steps'] == 20 and row['examples_per_sec'] > 0 and row['wall_s'] > 0
  assert cifar100['data'] == 'cifar100: tfds mock_data (random images)' and 0.0 <= cifar100['value'] <= 1.0
  assert rte['metric'] == 'accuracy' and 'real GLUE TSV' in rte['data']
  # The eval on RTE's dev split counts its examples (glue.py runlocal caps eval at 256; RTE dev has 222).
  summary = json.loads((tmp_path / 'glue_rte' / 'summary.json').read_text())
  assert summary['final']['num_examples'] == 222 and summary['completed']
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['budget'] == 'smoke' and [r['benchmark'] for r in saved['results']] == ['cifar100', 'glue_rte']
  table = (tmp_path / 'results.md').read_text()
  assert f'| {100 * rte["value"]:.2f} | — |' in table  # ours in percent, no paper number for GLUE
  assert '| CIFAR-100 |' in table and '| 79.21 |' in table


@pytest.mark.parametrize('budget', ['smoke', 'cpu'])
def test_tables_give_every_metric_in_percent_and_speak_to_users(budget):
  rows = [dict(title='CoLA', data='TSV', status='ok', steps=3, total_steps=3, metric='matthews', value=0.1234,
               majority=0.0, paper=None),
          dict(title='CIFAR-10', data='sample', status='ok', steps=3, total_steps=3, metric='top1', value=0.5,
               majority=0.1, paper=95.61)]
  table = suite.markdown(rows, budget, minutes=1.0)
  assert '| matthews | 12.34 |' in table and '| top1 | 50.00 |' in table
  assert 'ours (%)' in table and 'Every metric in percent' in table and '95.61' in table
  for word in ('dossier', 'UNVERIFIED', 'the issue'):
    assert word not in table


def test_missing_data_and_failures_are_reported_and_finished_runs_reused(tmp_path, monkeypatch):
  finished = tmp_path / 'imagenet'
  finished.mkdir()
  (finished / 'summary.json').write_text(json.dumps(
      {'step': 5, 'total_steps': 5, 'completed': True, 'final': {'top1': 0.75}, 'best': {}}))
  (finished / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in (
      {'step': 2, 'split': 'train', 'examples_per_sec': 1.0}, {'step': 4, 'split': 'train', 'examples_per_sec': 9.5},
      {'step': 5, 'split': 'eval', 'top1': 0.75})))
  broken = dataclasses.replace(suite.get_benchmark('cifar10'), name='broken',
                               config='experiments/cifar10.py:variant=4-384,optimiser=sgd')
  monkeypatch.setattr(suite, 'BENCHMARKS', suite.BENCHMARKS + (broken,))
  rows = suite.run_suite('full', tmp_path, ['cifar10_dvs', 'broken', 'imagenet'], log=lambda _: None)
  dvs, bad, imagenet = rows
  assert dvs['status'] == 'data not prepared' and 'spikingformer_jax.data.prepare' in dvs['error']
  assert dvs['prepare'].startswith('python -m spikingformer_jax.data.prepare --dataset=cifar10_dvs')
  assert bad['status'] == 'failed' and "Unknown config argument 'optimiser'" in bad['error']
  assert imagenet['status'] == 'ok (finished earlier)'
  assert (imagenet['value'], imagenet['steps'], imagenet['examples_per_sec']) == (0.75, 5, 9.5)
  table = (tmp_path / 'results.md').read_text()
  assert '**CIFAR10-DVS**: data not prepared' in table and '| 75.00 | 75.85 | 9.5 |' in table
  with pytest.raises(ValueError, match='budget='):
    suite.build_config(suite.BENCHMARKS[0], 'medium')


def test_cpu_budget_trains_for_its_minutes_and_reports_the_majority_baseline(tmp_path):
  """RTE on a 0.25-minute budget: the clock ends training (long before the recipe's 10 epochs), the final
  evaluation runs on the 222 dev pairs, and the majority baseline is computed on them."""
  shared_path('data', 'glue', 'RTE', 'train.tsv')
  rows = suite.run_suite('cpu', tmp_path, ['glue_rte', 'cifar100'], devices=jax.devices()[:1], log=lambda _: None,
                         minutes=0.25)
  rte, cifar100 = rows
  assert rte['status'] == 'ok', rte.get('traceback')
  assert 0 < rte['steps'] < rte['total_steps'] and rte['examples_seen'] == 32 * rte['steps']
  assert rte['train_wall_s'] >= 15  # the budget (start-up and compilation count), then the final evaluation
  summary = json.loads((tmp_path / 'glue_rte' / 'summary.json').read_text())
  assert summary['final']['num_examples'] == 222 and summary['completed']
  assert rte['majority'] == pytest.approx(114 / 222)  # 'entailment': 1,249 of RTE's 2,490 training pairs
  assert cifar100['status'] == 'no sample' and 'steps' not in cifar100
  table = (tmp_path / 'results.md').read_text()
  assert '(cpu, 0.25 minutes each)' in table and f'| {100 * rte["value"]:.2f} | 51.35 |' in table
  assert '| CIFAR-100 | no real sample offline: not run | — | no sample |' in table
