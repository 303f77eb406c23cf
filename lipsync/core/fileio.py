"""Writing a file so that a crash, Ctrl-C or a full disk never leaves half of one under its name."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Iterator


def current_umask() -> int:
    """The process's file-mode creation mask (e.g. 0o022): what new files' permissions leave out."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def partial_path(path: str, suffix: str = "") -> str:
    """A new, empty, hidden temporary file beside ``path`` (same file system, so renaming it to
    ``path`` is atomic), named ``.<name>.<random>.partial<suffix>``."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial" + suffix,
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    return tmp


def finish_partial(tmp: str, path: str) -> None:
    """Give ``tmp`` (from :func:`partial_path`) the permissions a new file gets under the umask (mkstemp
    made it private) and rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str, suffix: str = "") -> Iterator[str]:
    """``with atomic_write(path, ".npy") as tmp: np.save(tmp, x)``: yields a :func:`partial_path` beside
    ``path`` (``suffix`` for writers that choose the format by the extension) and renames it to ``path``
    when the block ends without an exception; on an exception (or Ctrl-C) the temporary file is removed
    and ``path`` keeps what it held."""
    tmp = partial_path(path, suffix)
    try:
        yield tmp
        finish_partial(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (constant memory). Raises OSError when the
    file cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
