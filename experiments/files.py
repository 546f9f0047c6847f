"""Writing result files so that an interruption never leaves half a file."""

from __future__ import annotations

import json
import os
import re
import tempfile


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  write_atomic(path, json.dumps(obj, indent=2) + "\n")


def replace_section(path: str, start: str, end: str, text: str) -> bool:
  """Replaces the text from the line beginning with `start` through `end`
  in the file at `path` by `text`; False (and nothing written) if the file
  has no such section."""
  with open(path) as f:
    old = f.read()
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
  if not pattern.search(old):
    return False
  write_atomic(path, pattern.sub(lambda _: text, old, count=1))
  return True
