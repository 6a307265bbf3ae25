"""Shared files: written whole or not at all, and shared work done by one holder of the lock at a time."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nnunet_tucker
from nnunet_tucker.files import atomic_write, file_lock

SOURCE_ROOT = Path(nnunet_tucker.__file__).parents[1]


def test_atomic_write_writes_text_bytes_or_through_a_function_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "é{}")
    assert target.read_text(encoding="utf-8") == "é{}"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, lambda f: f.write(b"written"))
    assert target.read_bytes() == b"written"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(OSError):  # a file where the folder should be
        atomic_write(target / "below", "x")


def test_a_held_lock_makes_another_thread_wait_until_it_is_released(tmp_path):
    lock = tmp_path / "work.lock"
    entered = threading.Event()

    def other() -> None:
        with file_lock(lock) as held:
            assert held
            entered.set()

    with file_lock(lock) as held:
        assert held and lock.exists()
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.5)  # waits while this one holds the lock
    assert entered.wait(10)
    thread.join()


WORKER = """
import sys, time
from pathlib import Path
from nnunet_tucker.files import file_lock
folder = Path(sys.argv[1])
while not (folder / "go").exists():  # start together
    time.sleep(0.01)
with file_lock(folder / "work.lock") as held:
    with open(folder / "log", "a") as log:
        log.write(f"enter {sys.argv[2]} {held}\\n")
    result = folder / "result"
    if not result.exists():  # the shared work: done by whoever comes first, read by the others
        time.sleep(0.5)
        result.write_text(sys.argv[2])
        with open(folder / "log", "a") as log:
            log.write(f"work {sys.argv[2]}\\n")
    with open(folder / "log", "a") as log:
        log.write(f"exit {sys.argv[2]}\\n")
"""


def test_processes_that_start_together_do_the_shared_work_once_one_at_a_time(tmp_path):
    env = {**os.environ, "TUCKER_HOOK": "0", "PYTHONPATH": str(SOURCE_ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(i)], env=env) for i in range(3)]
    time.sleep(0.5)  # let each import and wait for the start
    (tmp_path / "go").touch()
    assert [w.wait(60) for w in workers] == [0, 0, 0]
    lines = (tmp_path / "log").read_text().split("\n")[:-1]
    works = [line for line in lines if line.startswith("work")]
    assert len(works) == 1, lines
    held = [line for line in lines if line.startswith("enter")]
    assert len(held) == 3 and all(line.endswith(" True") for line in held), lines
    inside = 0
    for line in lines:  # enter and exit alternate: never two holders at once
        inside += {"enter": 1, "exit": -1, "work": 0}[line.split()[0]]
        assert inside in (0, 1), lines
    assert inside == 0


def test_where_the_lock_file_cannot_be_created_each_goes_on_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with file_lock(blocker / "sub" / "work.lock") as held:
        assert held is False
    (tmp_path / "folder.lock").mkdir()
    with file_lock(tmp_path / "folder.lock") as held_on_folder:
        assert held_on_folder is False
