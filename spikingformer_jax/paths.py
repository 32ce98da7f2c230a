"""Workdir paths: local or remote (gs://, or any other etils.epath / fsspec URL), one type for both.

Everything under a workdir (checkpoints, metrics, TensorBoard events, summary.json, the run lock)
goes through `path()`. gs:// needs gcsfs (etils.epath's backend without TensorFlow); Orbax's array
data goes through TensorStore, which reaches Cloud Storage on its own.
"""
from __future__ import annotations

import os
import pathlib

import fsspec
from etils import epath

# A bucket's listings change under this process (the job's other processes write checkpoints, other
# runs finish); gcsfs caches them for the life of the process unless told otherwise.
fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)


SHARED_ENV = 'SPIKINGFORMER_SHARED'


def shared_data_dir(*parts: str) -> pathlib.Path:
  """The real-data samples and vocabularies (`<shared>/data/...`): <shared> is $SPIKINGFORMER_SHARED, else
  ../shared from the working directory (beside a checkout that commands run from)."""
  shared = os.environ.get(SHARED_ENV) or os.path.join(os.pardir, 'shared')
  return pathlib.Path(shared).resolve().joinpath('data', *parts)


def is_remote(p) -> bool:
  return '://' in str(p)


def path(p) -> epath.Path:
  """`p` as an etils.epath.Path; a local one made absolute (Orbax requires that)."""
  return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def move_tree(src, dst) -> None:
  """Moves directory `src` to `dst` (which must not exist).

  Locally one atomic rename. Object stores have no directory rename: each file is copied
  server-side, deepest first (so a directory's top-level commit marker, Orbax's commit_success.txt
  or a weights checkpoint's COMMITTED, arrives last), then the source is deleted.
  """
  src, dst = path(src), path(dst)
  if dst.exists():
    raise FileExistsError(f'Cannot move {src} to {dst}: the target exists.')
  if not is_remote(src):
    src.rename(dst)
    return
  for relative in sorted(_files(src), key=lambda parts: -len(parts)):
    (src.joinpath(*relative)).copy(dst.joinpath(*relative))
  src.rmtree()


def _files(directory: epath.Path, prefix: tuple = ()):
  """The relative paths (tuples of names) of every file under `directory`."""
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files(child, prefix + (child.name,))
    else:
      yield prefix + (child.name,)
