"""Files that processes share: written whole or not at all (`atomic_write`), and shared work done once
(`file_lock`); and the content hash that names what cached files were made from (`state_dict_digest`).

Processes that start together (nnU-Net's ``-num_parts``, several TotalSegmentator runs) load the same
model at the same moment: they share the disk cache, the device profile and the self-calibration
record. A reader must never see half a file, and work that one of them does for all (timing the
layers, calibrating) should be done by one while the others wait and then read its result.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from filelock import FileLock


def atomic_write(path: Path, content: str | bytes | Callable[[IO[bytes]], Any]) -> None:
    """Write `path` whole or not at all: `content` (text as UTF-8, bytes, or a function that writes to
    the binary file it is given) goes to a temporary file beside `path` that is then renamed over it,
    so readers see the old file or the new one, never part of one, and concurrent writers leave one
    writer's file whole. Creates the folder if need be; on any error the temporary file is removed
    and the error raised (callers that must go on catch `OSError`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the file `path` (created if need be) while inside, waiting for as long
    as another process or thread holds it; yields whether one is held: False where the lock file
    cannot be created (a read-only folder, a file in the way) or the OS refuses a lock, and then each
    process goes on alone. Processes that start together (``-num_parts``) so do shared work once.

    `filelock` locks with ``flock`` on POSIX and ``LockFileEx`` on Windows, so this holds everywhere."""
    path = Path(path)
    held = False
    if _lock_file_created(path):
        lock = FileLock(path)  # no timeout: a holder's work (calibrating a model) takes as long as it takes
        try:
            lock.acquire()
            held = True
        except OSError:
            pass
    try:
        yield held
    finally:
        if held:
            lock.release()


def _lock_file_created(path: Path) -> bool:
    """Create the lock file (and its folder) if missing; False where that is not allowed. Checked here,
    not left to `filelock`: some of its versions take a denied open on Windows for a lock another
    process holds, and would wait forever."""
    for attempt in range(5):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
            return True
        except PermissionError:
            # on Windows, a lock file that its last holder is deleting denies opens for a moment
            if sys.platform != "win32" or attempt == 4:
                return False
            time.sleep(0.1)
        except OSError:
            return False
    return False


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=20)
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()
