"""Crash-safe files: the one place the project writes atomically and lists versions.

Everything that must never be seen half-written (run state, history rewrites, cached
statistics, checkpoint commits, SavedModel versions) goes through this module:

* `atomic_write` writes a file's bytes or text to a temporary name in the same folder,
  flushes it to disk and renames it over the target (`os.replace` is atomic on POSIX
  filesystems): a reader, or a process restarted after SIGKILL, sees the old file or
  the new one, never a mixture.
* `staged_directory` builds a directory under a hidden temporary name and renames it
  into place only once complete (how SavedModel versions appear to a polling server).
* Temporaries carry their owner (``.tmp-<tag>-<host>-<pid>-<random>``), so
  `remove_stale_temporaries` deletes exactly those whose process is gone.
* `list_versions` lists the integer version folders of a model base path.

The serving package keeps its own version listing (it imports nothing of this
library, so that it serves any SavedModel on a machine without it).
"""

import contextlib
import os
import pathlib
import shutil
import socket
import tempfile
import time

TEMP_PREFIX = ".tmp-"
# Another host's temporary on a shared filesystem is only removed once this old.
STALE_SECONDS = 24 * 3600


def _host():
    return socket.gethostname().replace("-", "_")


def _temp_prefix(tag):
    return f"{TEMP_PREFIX}{tag}-{_host()}-{os.getpid()}-"


def umask():
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(root):
    """Gives ``root`` and everything below it the modes of ordinary file creation:
    directories ``0o777 & ~umask``, files ``0o666 & ~umask`` (0755 / 0644 under the usual
    umask 022), so that any user allowed to read the parent (a server's own account)
    can read it; `tempfile.mkdtemp` and `tempfile.mkstemp` would leave 0700 / 0600."""
    mask = umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = pathlib.Path(root)
    if root.is_file():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def atomic_write(path, data):
    """Replaces ``path`` with ``data`` (``str`` is written as UTF-8) atomically.

    The bytes go to a temporary file beside ``path``, are flushed and fsynced, get the
    mode of an ordinary new file, and are renamed over ``path``. A kill at any moment
    leaves ``path`` as it was or complete; the temporary it may leave is found by
    `remove_stale_temporaries`. Returns ``path`` as a ``pathlib.Path``.
    """
    path = pathlib.Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def staged_directory(target, tag=None):
    """Yields a hidden, empty folder beside ``target``; renames it to ``target`` when the
    ``with`` block ends normally, deletes it when the block raises.

    The folder gets ordinary modes before the rename (see `make_readable`). Refuses
    (``FileExistsError``) when ``target`` exists, before and after the block: an existing
    directory is never replaced.
    """
    target = pathlib.Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists already; it is never overwritten.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(tag or target.name),
                                            dir=target.parent))
    try:
        yield staging
        make_readable(staging)  # modes survive the rename
        if target.exists():
            raise FileExistsError(f"{target} appeared while it was being written; "
                                  "it is never overwritten.")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _owner_alive(path):
    """Whether the process that made the temporary ``path`` may still be writing it.

    On this host, a process that is gone (or this very process, which only cleans up
    before it writes) left it behind. Another host's temporary on a shared filesystem,
    or a live process's, is left alone unless it is older than `STALE_SECONDS`.
    """
    try:
        if time.time() - path.lstat().st_mtime > STALE_SECONDS:
            return False
    except OSError:
        return False
    parts = path.name[len(TEMP_PREFIX):].rsplit("-", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False  # a name without an owner: a leftover
    host, pid = parts[1], int(parts[2])
    if host != _host():
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory):
    """Deletes the temporaries (`atomic_write` files, `staged_directory` folders) in
    ``directory`` whose writer is gone; returns their names, sorted."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if path.name.startswith(TEMP_PREFIX) and not _owner_alive(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def list_versions(base_dir):
    """Sorted integer version numbers of the folders directly under ``base_dir``
    (``[]`` when it does not exist). Hidden and non-numeric names are not versions."""
    base = pathlib.Path(base_dir)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.is_dir() and p.name.isdigit() and p.name.isascii())
