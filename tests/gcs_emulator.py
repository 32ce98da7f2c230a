"""gcp-storage-emulator as the gs:// tests run it: `python tests/gcs_emulator.py start --host=... --port=...`.

One difference from the package's own command: downloads carry the object's generation in the
`x-goog-generation` header, as Cloud Storage's do. TensorStore's OCDBT driver (Orbax's default array
format) takes a manifest's generation from that header to replace it conditionally; the emulator
sends none, and checkpoint saves then fail at random with "Malformed StorageGeneration".
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(stored['generation'])
    response['x-goog-metageneration'] = str(stored['metageneration'])


if __name__ == '__main__':
  objects.download = download  # Before the server module builds its routes from `objects`.
  from gcp_storage_emulator.__main__ import main  # noqa: E402
  sys.exit(main())
