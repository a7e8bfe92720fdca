"""Atomic file writes and kubetrain's temporary directories.

A reader never sees a half-written artifact: every file is written to a temporary file beside
it and renamed into place. A write that fails (a full disk, a read-only file system) leaves the
previous file as it was and says so in one line that names the file.

Temporary files and directories carry the host and process that made them, so a later start
can remove the ones a killed process (SIGKILL, a lost pod) left behind without touching those of
a process that is still running -- on this host or, on a shared volume, on another one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubetrain.core.errors import KubetrainError

# ".<target name>.<host>-<pid>.<random>.tmp": the temporary file of an atomic write.
_TMP_FILE = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
# "kubetrain-<purpose>-<pid>-<random>": a temporary directory (under the system temp dir).
_TMP_DIR = re.compile(r"^kubetrain-[a-z]+-(?P<pid>\d+)-")
# Below this many free bytes a failed write is taken to be a full disk: torch.save reports one
# as a RuntimeError ("file write failed"), not as ENOSPC.
_NEARLY_FULL = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _host() -> str:
    # Dots and dashes would make the temporary name ambiguous to parse.
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """True if process ``pid`` runs; a zombie (ended, not yet reaped) does not."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # someone else's process: alive
        return True


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def write_error(path: Path, err: BaseException) -> KubetrainError:
    """One line for a failed write of ``path``: "no space left" on a full disk.

    Args:
        path: the file that was being written.
        err: what the write raised.

    Returns:
        A KubetrainError to raise in its place (exit 1).
    """
    free = _free_bytes(path.parent)
    full = isinstance(err, OSError) and err.errno in _FULL
    if full or (free is not None and free < _NEARLY_FULL):
        return KubetrainError(
            f"no space left on device while writing {path} ({free or 0} bytes free on "
            f"{_mount_point(path.parent)}); the previous version of the file, if any, is intact"
        )
    if isinstance(err, OSError):
        return KubetrainError(f"cannot write {path}: {err.strerror or err}")
    return KubetrainError(f"cannot write {path}: {type(err).__name__}: {err}")


def _umask() -> int:
    """This process's umask: from /proc on Linux (reading it there changes nothing), else by
    setting it and back (the only portable way; another thread could create a file with the
    interim mask meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (0666/0777 less the umask):
    ``tempfile``'s files and directories are private (0600/0700), and one renamed into place
    would keep that, unreadable to the teammates sharing a run directory.

    Args:
        path: a file or a directory.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def _mount_point(directory: Path) -> Path:
    path = directory.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    Args:
        path: the file to write; its directory is created if missing.
        write: writes the whole content to the temporary path it is given.

    Returns:
        ``path``.

    Raises:
        KubetrainError: the file system refused the write (full, read-only, no permission) or
            ``write`` failed on a nearly full disk; ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_files(path.parent)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
    except OSError as err:
        raise write_error(path, err) from None
    os.close(fd)
    try:
        write(tmp)
        umask_mode(tmp)  # mkstemp's file is 0600: neighbours are 0644
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        error = write_error(path, err)  # measured before the temporary file frees its space
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and "no space left" not in str(error):
            raise  # not a write failure: a bug or a bad object, shown as such
        raise error from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary directory beside ``path`` for the caller to fill; when the block ends without
    an error it becomes ``path``, else it is removed: a reader never sees a half-written one.

    Args:
        path: the directory to make.
        replace: replace an existing ``path`` (else keep it: another process made it first).

    Yields:
        The temporary directory (on ``path``'s file system, so the final rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        umask_mode(tmp)  # mkdtemp's 0700: the directory is shared like the files in it
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed


def empty_directory(directory: Path) -> None:
    """Remove everything inside ``directory`` (not the directory itself): what a failed step
    half wrote into its output."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def clean_stale_files(directory: Path) -> int:
    """Remove temporary files of atomic writes in ``directory`` whose process (on this host)
    is gone: a SIGKILL between the write and the rename leaves one.

    Args:
        directory: where to look (not recursive).

    Returns:
        How many were removed. Those of live processes, or of another host (a shared volume),
        are left alone.
    """
    removed = 0
    host = _host()
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".tmp")]
    except OSError:
        return 0
    for name in names:
        m = _TMP_FILE.match(name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            try:
                os.unlink(directory / name)
                removed += 1
            except OSError:
                pass
    return removed


def make_temp_dir(purpose: str) -> Path:
    """A new private directory ``kubetrain-<purpose>-<pid>-*`` in the system temp directory.

    The caller removes it; if the process is killed first, ``clean_stale_temp_dirs`` does on a
    later start.

    Args:
        purpose: lower-case letters naming the use (``steps``, ``torchrun``).

    Returns:
        The new directory (mode 0700).

    Raises:
        ValueError: ``purpose`` is not lower-case letters.
    """
    if not purpose.isalpha() or not purpose.islower():
        raise ValueError(f"purpose must be lower-case letters: {purpose!r}")
    return Path(tempfile.mkdtemp(prefix=f"kubetrain-{purpose}-{os.getpid()}-"))


def clean_stale_temp_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove ``kubetrain-*`` temporary directories whose process is gone.

    Args:
        root: where to look (default: the system temp directory).

    Returns:
        The directories removed. Ones that cannot be removed (another user's) are left alone.
    """
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_DIR.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or _alive(int(m["pid"])):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def check_writable_dir(path: Path, what: str = "--output") -> None:
    """Check that ``path`` can become (or is) a directory this process can write in.

    Args:
        path: the directory, existing or not.
        what: how the user named it, for the message (``--output``).

    Raises:
        UsageError (exit 2): ``path`` is a file, lies under a file, or its directory (or the
            nearest existing parent) is read-only or not writable by this user.
    """
    from kubetrain.core.errors import UsageError

    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: exists and is a file, not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} {path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".kubetrain-probe-", dir=probe)
    except OSError as err:
        reason = "read-only file system" if err.errno == errno.EROFS else err.strerror
        raise UsageError(f"{what} {path}: cannot write in {probe} ({reason})") from None
    os.close(fd)
    os.unlink(name)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (see ``atomic_write``)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=float)
            f.write("\n")

    return atomic_write(path, _write)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``."""
    with open(path) as f:
        return json.load(f)
