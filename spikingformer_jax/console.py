"""What the command-line tools print: Orbax's INFO log lines (hundreds per checkpoint) are dropped."""
from __future__ import annotations

import logging
import os

from absl import logging as absl_logging


def drop_info_from(package: str):
  """A logging filter that drops the records below WARNING that `package`'s source files log."""
  marker = f'{os.sep}{package}{os.sep}'

  def keep(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or marker not in record.pathname
  return keep


def quiet_orbax():
  """Drops Orbax's INFO lines from absl's log output (its warnings and errors stay)."""
  absl_logging.get_absl_handler().addFilter(drop_info_from('orbax'))
