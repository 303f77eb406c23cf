"""lipsync.core.fileio.atomic_write: a file is replaced whole or not at all."""
import os

import pytest

from lipsync.core.fileio import atomic_write, current_umask


def test_the_block_writes_the_file_with_the_umask_permissions(tmp_path):
    path = tmp_path / "done.json"
    with atomic_write(str(path), ".json") as tmp:
        assert tmp.endswith(".partial.json") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as fh:
            fh.write("{}")
        assert not path.exists()              # nothing under the name until the block ends
    assert path.read_text() == "{}"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()
    assert os.listdir(tmp_path) == ["done.json"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_in_the_block_keeps_the_old_file_and_removes_the_partial_one(tmp_path, error):
    path = tmp_path / "mel.npy"
    path.write_text("old")
    with pytest.raises(error):
        with atomic_write(str(path)) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half of the ne")
            raise error()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["mel.npy"]
