"""One run per workdir: `<workdir>/RUN_LOCK` names the run that holds it (host, pid, start time).

A run takes the lock before it writes anything and releases it when it ends; in a multi-process
job process 0 holds it for all (`hold`). A second run on the same workdir stops with one line
naming the holder, instead of two runs interleaving their checkpoints.

- Local paths: an exclusive `fcntl.flock` on the file, kept while the run lives, so the kernel drops
  it however the process ends (also across hosts on NFS). A file left by a dead run is not locked:
  it is taken over with a warning naming that run.
- gs://: the object is written with generation preconditions (Cloud Storage's compare-and-swap):
  `ifGenerationMatch=0` creates it only if absent, a takeover or heartbeat replaces only the
  generation read. The holder refreshes its heartbeat at every checkpoint. A lock is stale, and
  taken over with a warning, when its process is gone (same host, dead pid) or its heartbeat is
  older than `stale_after_s`.
- Other URL schemes have no conditional create here: the run warns and goes on unlocked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from spikingformer_jax import paths

LOCK_NAME = 'RUN_LOCK'


class RunLockError(RuntimeError):
  """The workdir is held by another run, or this run lost its lock."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: float  # time.time() at acquisition
  heartbeat: float  # time.time() at the last refresh
  processes: int = 1

  @classmethod
  def me(cls, started: float | None = None) -> Holder:
    now = time.time()
    return cls(socket.gethostname(), os.getpid(), now if started is None else started, now, jax.process_count())

  @classmethod
  def parse(cls, text: str) -> Holder | None:
    """The holder written in a lock file; None for an empty (released) or unreadable one."""
    try:
      fields = json.loads(text)
      return cls(str(fields['host']), int(fields['pid']), float(fields['started']), float(fields['heartbeat']),
                 int(fields.get('processes', 1)))
    except (ValueError, KeyError, TypeError):
      return None

  def dumps(self) -> str:
    return json.dumps(dataclasses.asdict(self) | {'started_utc': _utc(self.started)}, indent=1)

  def describe(self) -> str:
    ago = max(0, time.time() - self.heartbeat)
    return (f'host {self.host}, pid {self.pid}, started {_utc(self.started)} '
            f'({self.processes} process{"es" if self.processes > 1 else ""}; last heartbeat {ago:.0f} s ago)')

  def is_stale(self, stale_after_s: float) -> bool:
    if self.host == socket.gethostname() and not _alive(self.pid):
      return True
    return time.time() - self.heartbeat > stale_after_s


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  return True


def _refusal(lock_path, holder: Holder | None) -> RunLockError:
  who = holder.describe() if holder else 'a run whose lock file is being written'
  return RunLockError(f'{lock_path.parent} is in use by another run ({who}). Wait for it to end, use another '
                      f'--workdir, or delete {lock_path} if that run is gone.')


def _takeover_warning(lock_path, holder: Holder, why: str):
  logging.warning('Taking over the run lock %s from %s: %s.', lock_path, holder.describe(), why)


class _LocalLock:
  def __init__(self, lock_path, stale_after_s: float):
    del stale_after_s  # The kernel knows whether the holder lives.
    self.path, self._fd = lock_path, None

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise _refusal(self.path, Holder.parse(self.path.read_text())) from None
    previous = Holder.parse(os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace'))
    if previous is not None:
      _takeover_warning(self.path, previous, 'that run ended without releasing it')
    self._fd = fd
    self._write(Holder.me().dumps())

  def _write(self, text: str):
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, text.encode(), 0)
    os.fsync(self._fd)

  def refresh(self):
    pass  # flock needs no heartbeat.

  def release(self):
    if self._fd is not None:
      self._write('')  # An empty file: free, and nobody to warn about.
      os.close(self._fd)  # Closing drops the flock.
      self._fd = None


class _GcsLock:
  def __init__(self, lock_path, stale_after_s: float):
    from google.api_core import exceptions  # noqa: PLC0415 (only for gs://)
    from google.cloud import storage  # noqa: PLC0415
    bucket, _, key = str(lock_path)[len('gs://'):].partition('/')
    self._blob = storage.Client().bucket(bucket).blob(key)
    self._errors = exceptions
    self.path, self.stale_after_s = lock_path, stale_after_s
    self._holder, self._generation = None, None

  def _read(self) -> tuple[Holder | None, int | None]:
    """(holder, generation) of the lock object; (None, None) when there is none."""
    while True:
      try:
        self._blob.reload()  # The generation; a write conditioned on it fails if the object changed since.
        generation = self._blob.generation
        return Holder.parse(self._blob.download_as_text(if_generation_match=generation)), generation
      except self._errors.NotFound:
        return None, None
      except self._errors.PreconditionFailed:  # Rewritten between the two requests: read again.
        continue

  def _put(self, holder: Holder, generation: int) -> bool:
    """Writes `holder` if the object's generation is still `generation` (0: absent); False if not."""
    try:
      self._blob.upload_from_string(holder.dumps(), content_type='application/json',
                                    if_generation_match=generation)
    except self._errors.PreconditionFailed:
      return False
    self._holder, self._generation = holder, self._blob.generation
    return True

  def acquire(self):
    # Read first, then write conditionally: the read names the holder for the refusal, the
    # precondition settles a race between two runs starting (or taking over) at once.
    holder, generation = self._read()
    if generation is None:
      if self._put(Holder.me(), 0):
        return
    elif holder is None or not holder.is_stale(self.stale_after_s):
      raise _refusal(self.path, holder)
    elif self._put(Holder.me(), generation):
      _takeover_warning(self.path, holder, 'its process is gone' if holder.host == socket.gethostname()
                        else f'its heartbeat is older than {self.stale_after_s:.0f} s')
      return
    raise _refusal(self.path, self._read()[0])  # Another run won the race.

  def refresh(self):
    current, generation = self._read()
    if (current, generation) == (self._holder, self._generation) and self._put(
        dataclasses.replace(self._holder, heartbeat=time.time()), generation):
      return
    current, _ = self._read()
    raise RunLockError(f'Lost the run lock {self.path}: ' + (f'{current.describe()} took it over' if current else
                                                            'the lock was deleted') + '. Stopping this run.')

  def release(self):
    if self._generation is None:
      return
    try:
      self._blob.delete(if_generation_match=self._generation)
    except (self._errors.PreconditionFailed, self._errors.NotFound):
      logging.warning('Run lock %s was changed by someone else; left as it is.', self.path)
    self._generation = None


class _NoLock:
  def __init__(self, lock_path, stale_after_s: float):
    del stale_after_s
    logging.warning('No run lock on %s: only local paths and gs:// have an atomic create here. Make sure no other '
                    'run uses this workdir.', lock_path.parent)

  def acquire(self):
    pass

  def refresh(self):
    pass

  def release(self):
    pass


def make_lock(workdir, stale_after_s: float):
  """The lock of `workdir` (not yet acquired)."""
  lock_path = paths.path(workdir) / LOCK_NAME
  if not paths.is_remote(lock_path):
    return _LocalLock(lock_path, stale_after_s)
  if str(lock_path).startswith('gs://'):
    return _GcsLock(lock_path, stale_after_s)
  return _NoLock(lock_path, stale_after_s)


def _broadcast_text(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process (utf-8, at most `size` bytes)."""
  buffer = np.zeros(size, np.uint8)
  data = text.encode()[:size]
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(received).rstrip(b'\0').decode('utf-8', 'replace')


@contextlib.contextmanager
def hold(workdir, stale_after_s: float):
  """Holds the workdir's lock for the whole job (process 0 takes it); yields it (None off process 0).

  Every process raises the same RunLockError when process 0 is refused or cannot take it.
  """
  lock, refusal = None, ''
  if jax.process_index() == 0:
    try:
      lock = make_lock(workdir, stale_after_s)
      lock.acquire()
    except RunLockError as e:
      lock, refusal = None, str(e)
    except Exception as e:  # e.g. no permission: every process must hear of it, or the others wait forever.
      lock, refusal = None, f'Cannot take the run lock of {workdir} ({type(e).__name__}: {e}).'
  if jax.process_count() > 1:
    refusal = _broadcast_text(refusal)
  if refusal:
    raise RunLockError(refusal)
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
