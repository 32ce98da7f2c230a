"""Metrics of a resumed run continue from its checkpoint: later JSONL lines dropped, TensorBoard told to purge."""
import json
import struct

from tensorboardX.proto import event_pb2

from spikingformer_jax.metric_writer import MetricWriter


def _events(path):
  """The Events of a TFRecord file (8-byte length, its crc, the data, its crc)."""
  data, events = path.read_bytes(), []
  while data:
    (length,) = struct.unpack('<Q', data[:8])
    events.append(event_pb2.Event.FromString(data[12:12 + length]))
    data = data[16 + length:]
  return events


def _scalars(events):
  return [(e.step, v.tag, round(v.simple_value, 6)) for e in events for v in e.summary.value]


def test_resuming_drops_metrics_after_the_restored_step(tmp_path):
  writer = MetricWriter(tmp_path)
  for step in range(1, 6):
    writer.write(step, 'train', {'loss': 1.0 / step})
  writer.write(5, 'eval', {'top1': 0.5})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "split": "tr')  # A line torn by a kill -9.

  writer = MetricWriter(tmp_path, start_step=3)  # Resumed from the checkpoint of step 3.
  writer.write(4, 'train', {'loss': 0.2})
  writer.close()
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['split']) for l in lines] == [(1, 'train'), (2, 'train'), (3, 'train'), (4, 'train')]
  assert lines[-1]['loss'] == 0.2
  # TensorBoard hides the first run's events from step 4 on: the second file starts with a purge at step 4.
  first, second = sorted((_events(p) for p in (tmp_path / 'tensorboard').iterdir()), key=lambda e: len(_scalars(e)),
                         reverse=True)
  assert (5, 'eval/top1', 0.5) in _scalars(first)
  assert _scalars(second) == [(4, 'train/loss', 0.2)]
  starts = [e.step for e in second if e.HasField('session_log') and e.session_log.status == e.session_log.START]
  assert starts == [4]
