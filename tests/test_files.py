"""keras_alexnet.files: atomic writes, staged directories, stale temporaries, versions."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from keras_alexnet import files


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def _dead_pid():
    """The pid of a process that has finished (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_atomic_write_replaces_the_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    assert files.atomic_write(target, "first") == target
    assert target.read_text() == "first"
    files.atomic_write(str(target), b"\x00second\xff")  # str paths and bytes work too
    assert target.read_bytes() == b"\x00second\xff"
    files.atomic_write(target, "non-ASCII: \u00e9\u4e2d")
    assert target.read_bytes() == "non-ASCII: \u00e9\u4e2d".encode("utf-8")
    assert _entries(tmp_path) == ["state.json"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch,
                                                                    step, error):
    target = tmp_path / "history.csv"
    files.atomic_write(target, "old content")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(files.os, step, fail)
    with pytest.raises(type(error)):
        files.atomic_write(target, "new content " * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old content"
    assert _entries(tmp_path) == ["history.csv"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        files.atomic_write(tmp_path / "new.bin", 12345)  # neither bytes nor str
    assert _entries(tmp_path) == []


def test_written_files_get_the_mode_of_an_ordinary_new_file(tmp_path, umask_027):
    target = files.atomic_write(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask_027 == 0o640
    os.umask(0o022)
    files.atomic_write(target, "y")  # the mode of the new file, not of mkstemp's 0600
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert files.umask() == 0o022


def test_staged_directory_renames_into_place_on_success(tmp_path, umask_027):
    target = tmp_path / "models" / "3"
    with files.staged_directory(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(files.TEMP_PREFIX)
        assert not target.exists()  # nothing visible until the block ends
        (staging / "saved_model.pb").write_bytes(b"pb")
        (staging / "variables").mkdir()
    assert (target / "saved_model.pb").read_bytes() == b"pb"
    assert _entries(target.parent) == ["3"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "variables").stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "saved_model.pb").stat().st_mode) == 0o640


def test_staged_directory_removes_the_staging_when_the_block_raises(tmp_path):
    target = tmp_path / "1"
    with pytest.raises(RuntimeError, match="export failed"):
        with files.staged_directory(target) as staging:
            (staging / "half-written").write_bytes(b"...")
            raise RuntimeError("export failed")
    assert _entries(tmp_path) == []


def test_staged_directory_never_replaces_an_existing_target(tmp_path):
    target = tmp_path / "1"
    target.mkdir()
    (target / "keep").write_text("old")
    ran = []
    with pytest.raises(FileExistsError):
        with files.staged_directory(target):
            ran.append(True)
    assert not ran  # refused before the block
    assert (target / "keep").read_text() == "old" and _entries(tmp_path) == ["1"]

    # A target that appears while the block runs is not replaced either.
    late = tmp_path / "2"
    with pytest.raises(FileExistsError, match="appeared"):
        with files.staged_directory(late) as staging:
            (staging / "new").write_text("new")
            late.mkdir()
            (late / "theirs").write_text("theirs")
    assert _entries(late) == ["theirs"] and _entries(tmp_path) == ["1", "2"]


def test_remove_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    host = files._host()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead_file = f"{files.TEMP_PREFIX}x-{host}-{dead}-abc"
        dead_dir = f"{files.TEMP_PREFIX}5-{host}-{dead}-def"
        live_file = f"{files.TEMP_PREFIX}x-{host}-{live.pid}-abc"
        other_host = f"{files.TEMP_PREFIX}x-{host}else-{dead}-abc"
        ownerless = f"{files.TEMP_PREFIX}junk"
        for name in (dead_file, live_file, other_host, ownerless):
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / dead_dir).mkdir()
        (tmp_path / dead_dir / "saved_model.pb").write_bytes(b"partial")
        for name in ("state.json", "x.tmp", "5"):
            (tmp_path / name).write_text("keep")

        removed = files.remove_stale_temporaries(tmp_path)
        assert removed == sorted([dead_file, dead_dir, ownerless])
        assert _entries(tmp_path) == sorted(["state.json", "x.tmp", "5", live_file,
                                             other_host])
        assert files.remove_stale_temporaries(tmp_path) == []

        # Another host's (or a live process's) temporary goes once it is a day old.
        old = time.time() - files.STALE_SECONDS - 60
        os.utime(tmp_path / other_host, (old, old))
        assert files.remove_stale_temporaries(tmp_path) == [other_host]
    finally:
        live.kill()
        live.wait()
    assert files.remove_stale_temporaries(tmp_path / "missing") == []


def test_list_versions_lists_numeric_folders_in_numeric_order(tmp_path):
    assert files.list_versions(tmp_path / "missing") == []
    for name in ("10", "2", "1", ".3", f"{files.TEMP_PREFIX}4-h-1-x", "abc", "5a",
                 "-6", "\u0663"):  # an Arabic-Indic digit: isdigit() but not a version
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert files.list_versions(tmp_path) == [1, 2, 10]
    assert files.list_versions(str(tmp_path)) == [1, 2, 10]


# The child loads files.py on its own (no TensorFlow import), writes the first payload,
# says so, then writes the two payloads in turn until it is killed.
_WRITER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
size = int(sys.argv[3])
payloads = [bytes([65]) * size, bytes([66]) * size]
files.atomic_write(sys.argv[2], payloads[0])
print("ready", flush=True)
i = 1
while True:
    files.atomic_write(sys.argv[2], payloads[i % 2])
    i += 1
"""


def test_sigkill_during_atomic_writes_never_leaves_a_partial_file(tmp_path):
    size = 20 * 1024 * 1024
    payloads = (b"A" * size, b"B" * size)
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, files.__file__, str(target), str(size)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # now in the middle of some later write, most likely
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    content = target.read_bytes()
    assert len(content) == size and content in payloads
    # The killed writer's temporary, if any, is stale: nothing else is left afterwards.
    files.remove_stale_temporaries(tmp_path)
    assert _entries(tmp_path) == ["big.bin"]
