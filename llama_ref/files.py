"""Outputs that appear whole or not at all: a checkpoint, a downloaded asset, a GGUF file."""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(target, directory: bool = False):
    """Yield a staging path beside `target` (a new empty directory when `directory`, else a
    file name not yet created) and, when the block ends without an error, rename it to
    `target` in one step. On an error, or an interrupt, the staging path is removed: nothing
    partial is ever seen under the target's name, and nothing is left beside it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        staging.chmod(0o755)             # mkdtemp makes it private; what it becomes is not
        yield staging if directory else staging / target.name
        os.replace(staging if directory else staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
