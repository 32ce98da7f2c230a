"""gcp-storage-emulator as the gs:// tests run it: `python tests/gcs_emulator.py start --host=... --port=...`.

Two differences from the package's own command, both where Cloud Storage behaves otherwise:
- Downloads carry the object's generation in the `x-goog-generation` header. TensorStore's OCDBT driver
  (Orbax's default array format) takes a manifest's generation from that header to replace it conditionally;
  the emulator sends none, and checkpoint saves then fail at random with "Malformed StorageGeneration".
- Uploads, downloads and deletes honour `ifGenerationMatch` (0: the object must not exist) with 412
  Precondition Failed, which the package ignores: run_lock.py's gs:// lock is a compare-and-swap on it.
  The server handles one request at a time, so each check and the write after it are one step.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert, _delete = objects.download, objects.insert, objects.delete


def _object_id(request):
  if request.params.get('object_id'):
    return request.params['object_id']
  if 'name' in request.query:
    return request.query['name'][0]
  return request.data['meta'].get('name')  # a multipart upload names the object in its metadata


def _precondition_holds(request, response, storage) -> bool:
  """Whether the request's `ifGenerationMatch` (if any) is the object's generation (0: absent); else a 412."""
  expected = request.query.get('ifGenerationMatch')
  if not expected:
    return True
  try:
    generation = int(storage.get_file_obj(request.params['bucket_name'], _object_id(request))['generation'])
  except NotFound:
    generation = 0
  if generation == int(expected[0]):
    return True
  response.status = HTTPStatus.PRECONDITION_FAILED
  message = f'At least one of the pre-conditions you specified did not hold (generation {generation}).'
  response.json({'error': {'code': 412, 'message': message,
                           'errors': [{'reason': 'conditionNotMet', 'message': message}]}})
  return False


def download(request, response, storage, *args, **kwargs):
  if not _precondition_holds(request, response, storage):
    return
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(stored['generation'])
    response['x-goog-metageneration'] = str(stored['metageneration'])


def insert(request, response, storage, *args, **kwargs):
  if _precondition_holds(request, response, storage):
    _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  if _precondition_holds(request, response, storage):
    _delete(request, response, storage, *args, **kwargs)


if __name__ == '__main__':
  # Before the server module builds its routes from `objects`.
  objects.download, objects.insert, objects.delete = download, insert, delete
  from gcp_storage_emulator.__main__ import main  # noqa: E402
  sys.exit(main())
