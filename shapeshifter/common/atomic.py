"""The one atomic file writer: a temporary file beside the target, fsync, rename over it, fsync the
folder. A crash or an error at any point leaves either the old file or the new one, never a torn
one, and no temporary file behind (the folder fsync makes the rename itself survive power loss)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", *, plain_mode: bool = False,
                 make_parents: bool = False, **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Yield a file to write; it replaces `path` when the block ends without an exception.
    mode: "w" (text; open_kwargs such as encoding, newline) or "wb". plain_mode: give the file a
    plain file's permissions (0666 less the umask) instead of mkstemp's 0600. make_parents:
    create missing folders (off for state files: a vanished state folder is an error to report,
    not one to paper over)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: atomic_write writes whole files ('w' or 'wb')")
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if plain_mode:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
