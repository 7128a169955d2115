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


def open_private(layout: Layout, create: bool = True) -> int:
    """A checked fd of `gunicorn-monitor/`, for a writer.

    DirectoryError (an OSError) when missing or unusable, UnsafeDirectory when not ours alone.
    The caller owns the fd and closes it once.
    """
    root = _open_level(None, layout.root, layout.root, create, top=True)
    try:
        return _open_level(root, OWN, layout.own, create, top=False)
    finally:
        os.close(root)


def open_heartbeats(own_fd: int, layout: Layout, create: bool = False) -> int:
    """A checked fd of `heartbeat/` below an open `gunicorn-monitor/`; the caller closes it."""
    return _open_level(own_fd, HEARTBEATS, layout.heartbeats, create, top=False)


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
