"""Where everything lives in the shared directory, and who may be trusted to have put it there.

Layout of `$PROMETHEUS_MULTIPROC_DIR`:

- `*.db` at the top: the application's own prometheus_client multiprocess files (served as is).
- `gunicorn-monitor/`: what the hooks record, and nothing else writes there:
  - `counter_<master pid>.db`, `histogram_<master pid>.db`, `gauge_max_<id>.db`: lifecycle
    counts in prometheus_client's own file format, one writer per file;
  - `master-<pid>.json`: the live state of one master (its workers, their slots);
  - `retired.json` (+ `.retire.lock`): the counts of masters that are gone and accounted for,
    folded by the sidecar (sidecar/retirement.py), which then removes their files;
  - `events.jsonl` (+ `events.jsonl.<time>-<pid>`, rotated): the journal, one JSON record per
    event;
  - `heartbeat/<master pid>`: when each master's loop last turned (contract/heartbeat.py).

Trust (README, "The directory's trust model"): `gunicorn-monitor/` must belong to
the user that writes it and be writable by nobody else; the top directory must belong to that
user or to root (an orchestrator's volume, e.g. a Kubernetes emptyDir, which is root's and 0777),
and may be writable by others only when it is root's. No component of ours is ever a symlink:
writers open each level with O_NOFOLLOW and everything below it relative to the directory fd,
so a path swapped under them cannot send a write anywhere else.

The primitives every writer uses (the hooks now; the sidecar's writers may too), and why each is
enough even in a top directory any local user may write (a Kubernetes emptyDir is root's, 0777,
with no sticky bit: anyone may rename `gunicorn-monitor/` away and put their own in its place):

- `open_top`, `open_private`, `open_subdir`: a directory fd, each level opened with O_NOFOLLOW
  relative to the fd of the level above, then checked by fstat (a real directory; ours alone,
  or, for the top only, root's). A fd is an inode: whatever the names later say, everything
  opened relative to it lands in the directory that was checked.
- `open_file`: an existing file in a checked directory, never through a symlink (O_NOFOLLOW),
  never hanging on a FIFO (O_NONBLOCK), and only a regular file.
- `create_file`: a new file of our own (O_CREAT | O_EXCL | O_NOFOLLOW, 0600, whatever had that
  name removed first, never followed), its bytes allocated before anything is written: the
  only kind of file anything of ours may map (a full disk fails the creation, never a store).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from dataclasses import dataclass

ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT = "/tmp/gunicorn-monitor"
OWN = "gunicorn-monitor"


class DirectoryError(OSError):
    """The shared directory is missing, unreadable, or not ours to use (an OSError, with errno)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class UnsafeDirectory(DirectoryError):
    """A symlink, another user's directory, or one that others may write: never written to."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


HEARTBEATS = "heartbeat"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Added to every file open: never through a symlink, never waiting for a FIFO's other end.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def resolve(path: str | None = None) -> str:
    return os.path.abspath(path or os.environ.get(ENV) or DEFAULT)


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def own(self) -> str:
        return os.path.join(self.root, OWN)

    @property
    def heartbeats(self) -> str:
        return os.path.join(self.own, HEARTBEATS)

    @property
    def journal(self) -> str:
        return os.path.join(self.own, "events.jsonl")

    def master_state(self, pid: int) -> str:
        return os.path.join(self.own, f"master-{pid}.json")


def check_private(st: os.stat_result, path: str, top: bool = False) -> None:
    """UnsafeDirectory unless `st` is a directory only its owner, the current user, may write.

    The top directory may also be root's, and then writable by others: a volume an
    orchestrator made for the pod. Everything the hooks write is below it, in directories that
    pass the strict check, opened without following symlinks.
    """
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{path} is a symlink; give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    me = os.geteuid()
    if top and st.st_uid == 0:
        return
    if st.st_uid != me:
        raise UnsafeDirectory(f"{path} is owned by uid {st.st_uid}, not by uid {me}")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{path} is writable by group or others (mode {st.st_mode & 0o7777:04o}); chmod go-w it"
        )


def _open_level(parent: int | None, name: str, shown: str, create: bool, top: bool) -> int:
    """One directory level: created 0700 if asked, opened without following a symlink, checked."""
    if create:
        try:
            if parent is None:
                os.makedirs(name, mode=0o700, exist_ok=True)
            else:
                os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # a symlink or a file in the way is refused just below
        except OSError as e:
            raise DirectoryError(e.errno, f"cannot create {shown}: {e.strerror}") from None
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, parent):
            # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR, or ELOOP.
            raise UnsafeDirectory(f"{shown} is a symlink; give the real directory") from None
        if e.errno == errno.ENOTDIR:
            raise DirectoryError(e.errno, f"{shown} is not a directory") from None
        raise DirectoryError(e.errno, f"cannot open {shown}: {e.strerror}") from None
    try:
        check_private(os.fstat(fd), shown, top)
    except BaseException:
        os.close(fd)  # ours alone, never handed out: closed once
        raise
    return fd


def _is_symlink(name: str, parent: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_top(layout: Layout, create: bool = False) -> int:
    """A checked fd of the top directory (`$PROMETHEUS_MULTIPROC_DIR`): ours, or root's (then
    possibly writable by others: only what is opened below it through `open_subdir` is ours).
    The caller owns the fd and closes it once."""
    return _open_level(None, layout.root, layout.root, create, top=True)


def open_private(layout: Layout, create: bool = True) -> int:
    """A checked fd of `gunicorn-monitor/`, for a writer.

    DirectoryError (an OSError) when missing or unusable, UnsafeDirectory when not ours alone.
    The caller owns the fd and closes it once.
    """
    root = open_top(layout, create)
    try:
        return open_subdir(root, OWN, layout.own, create)
    finally:
        os.close(root)


def open_subdir(parent: int, name: str, shown: str, create: bool = False) -> int:
    """A checked fd of the directory `name` below the checked directory fd `parent`: created
    0700 if missing and asked, never a symlink, ours alone (UnsafeDirectory otherwise).
    `shown` is its path, for messages. The caller owns the fd and closes it once."""
    return _open_level(parent, name, shown, create, top=False)


def open_heartbeats(own_fd: int, layout: Layout, create: bool = False) -> int:
    """A checked fd of `heartbeat/` below an open `gunicorn-monitor/`; the caller closes it."""
    return open_subdir(own_fd, HEARTBEATS, layout.heartbeats, create)


def open_file(dir_fd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """The existing regular file `name` in a checked directory, opened with `flags`: never
    through a symlink (ELOOP), never waiting on a FIFO, and OSError (EINVAL) for anything but a
    regular file. The caller owns the fd and closes it once."""
    fd = os.open(name, flags | _FILE_FLAGS, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
    except BaseException:
        os.close(fd)  # ours alone, never handed out: closed once
        raise
    return fd


def create_file(dir_fd: int, name: str, flags: int = os.O_WRONLY, size: int = 0) -> int:
    """A new, empty file of our own (0600) named `name` in a checked directory, opened with
    `flags`, with `size` bytes allocated (posix_fallocate: ENOSPC now, never SIGBUS from a
    store into a mapping of it later).

    Whatever had that name is removed first (unlink never follows a symlink), and the file is
    created O_EXCL | O_NOFOLLOW: the fd is always of a file this call made, never of one that
    someone else put, linked or swapped there. On any failure nothing is left behind. The
    caller owns the fd and closes it once.
    """
    _unlink_quietly(dir_fd, name)
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)  # ours alone, never handed out: closed once
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return fd


def replace_file(
    dir_fd: int, name: str, data: bytes, sync: bool = False, tmp: str | None = None
) -> tuple[int, int]:
    """`name` in a checked directory replaced whole by `data`: written into a new file of our
    own (`create_file`, named `tmp`: by default `.<name>.<pid>.tmp`), fsynced if `sync`, then
    renamed over it, so that a reader sees the old file or the new one, never a part. Returns
    the new file's (st_dev, st_ino). On any failure nothing is left behind."""
    tmp = tmp or f".{name}.{os.getpid()}.tmp"
    fd = create_file(dir_fd, tmp)  # a plain write: ENOSPC is an error, nothing maps it
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            if sync:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return st.st_dev, st.st_ino


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def create(path: str | None = None) -> Layout:
    """Create (mode 0700) and check the directory tree for a writer: the hooks, or mark-deploy."""
    layout = Layout(resolve(path))
    os.close(open_private(layout, create=True))
    return layout


RUNNING_MASTER = "GUNICORN_MONITOR_MASTER_PID"  # set by the hooks once a master runs


def create_or_exit(path: str | None = None) -> Layout:
    """For gunicorn.conf.py: an unusable directory is one line on stderr and exit status 2.

    Except in a running master re-reading its config on HUP: exiting there would take the
    whole server down. It says so in one line and keeps serving; the recorder, which checks
    the directory on every turn of the master's loop, resumes recording once it is fixed.
    """
    try:
        return create(path)
    except DirectoryError as e:
        line = f"gunicorn-monitor: {ENV}: {e}"
        if os.environ.get(RUNNING_MASTER) == str(os.getpid()):
            logging.getLogger("gunicorn.error").error("%s (kept running)", line)
            return Layout(resolve(path))
        sys.stderr.write(line + "\n")
        raise SystemExit(2) from None


def open_for_reading(path: str | None = None, missing_ok: bool = False) -> Layout:
    """Check a directory a reader (the sidecar, `events`) will read, by the writers' rules.

    It may hold no Gunicorn data yet; with `missing_ok` it may not even exist yet (a sidecar
    that starts first). DirectoryError (errno ENOENT) when missing, UnsafeDirectory when a
    symlink, another user's or writable by others, DirectoryError when unreadable. A reader
    also accepts a `gunicorn-monitor/` of root's that only root may write (a Gunicorn run as
    root, read by an unprivileged sidecar): root needs no directory to reach the reader.
    """
    layout = Layout(resolve(path))
    for shown, top in ((layout.root, True), (layout.own, False)):
        try:
            st = os.lstat(shown)
        except FileNotFoundError:
            if top and not missing_ok:
                raise DirectoryError(errno.ENOENT, f"{shown} does not exist") from None
            return layout
        except OSError as e:
            raise DirectoryError(e.errno, cannot_read(shown, e)) from None
        roots = st.st_uid == 0 and stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022
        check_private(st, shown, top=top or roots)
        if not os.access(shown, os.R_OK | os.X_OK):
            raise DirectoryError(errno.EACCES, cannot_read(shown))
    return layout


def open_own_for_reading(layout: Layout) -> int:
    """A checked fd of `gunicorn-monitor/` for a reader, by `open_for_reading`'s rules, each
    level opened without following a symlink: whatever its name leads to later, what is read
    through the fd is the directory that was checked. FileNotFoundError when it is not there
    (yet), UnsafeDirectory or DirectoryError otherwise. The caller closes it once."""
    parent = None
    try:
        for name, shown, top in ((layout.root, layout.root, True), (OWN, layout.own, False)):
            fd = _open_read_level(parent, name, shown, top)
            if parent is not None:
                os.close(parent)  # the level above, ours alone: closed once
            parent = fd
    except BaseException:
        if parent is not None:
            os.close(parent)
        raise
    return parent


def open_subdir_for_reading(parent: int, name: str, shown: str) -> int:
    """A checked fd of the directory `name` below a reader's checked fd `parent`, by the same
    rules (ours, or root's that only root may write; never a symlink). The caller closes it."""
    return _open_read_level(parent, name, shown, top=False)


def _open_read_level(parent: int | None, name: str, shown: str, top: bool) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, parent):
            raise UnsafeDirectory(f"{shown} is a symlink; give the real directory") from None
        raise DirectoryError(e.errno, cannot_read(shown, e)) from None
    try:
        st = os.fstat(fd)
        roots = st.st_uid == 0 and not st.st_mode & 0o022
        check_private(st, shown, top=top or roots)
    except BaseException:
        os.close(fd)  # ours alone, never handed out: closed once
        raise
    return fd


def cannot_read(path: str, error: OSError | None = None) -> str:
    """Why this process cannot read `path` (or the file `error` names in it), in one line: the
    permission it lacks, and the owner and mode that deny it, or the error itself."""
    if error is not None and error.filename is not None:
        name = os.fsdecode(error.filename)
        path = name if os.path.isabs(name) else os.path.join(path, name)
    me = os.geteuid()
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return f"{path} does not exist (removed while it was read?)"
    except OSError as e:
        if e.errno == errno.EACCES:  # a directory above it may not be searched
            parent = os.path.dirname(path)
            return cannot_read(parent) if parent != path else f"cannot read {path}: {e.strerror}"
        return f"cannot read {path}: {e.strerror}"
    if error is not None and error.errno not in (errno.EACCES, errno.EPERM):
        return f"cannot read {path}: {error.strerror}"
    need = "read and search (r-x)" if stat.S_ISDIR(st.st_mode) else "read (r)"
    return (
        f"{path} is not readable by uid {me}: it needs {need} permission, and it is owned by "
        f"uid {st.st_uid} (gid {st.st_gid}) with mode {stat.S_IMODE(st.st_mode):04o}"
    )
