"""The server a Gunicorn command line starts, resolved by Gunicorn's own code.

`gunicorn-monitor doctor -- gunicorn -c CONF -k gevent --timeout 10 app:app` must judge the
server that command starts, not a guess at it. So nothing here parses or merges settings itself:

- the settings are Gunicorn's `Application.load_config` (app/base.py, unchanged from 22.0 to
  27.0.1): its own argument parser, and its own precedence, defaults < config file <
  GUNICORN_CMD_ARGS < command line; the config file is `-c PATH`, `-c file:PATH` or
  `-c python:MODULE` from the command line, else GUNICORN_CMD_ARGS's, else ./gunicorn.conf.py;
- the worker class is Gunicorn's `Config.worker_class` (`util.load_class`, with sync turned
  gthread by `threads`), loaded with the working directory and `sys.path` the master has when
  it loads it (after `chdir` and `pythonpath`), so a subclass in the user's module is imported.

Loading runs the user's config in this process, as the master does: what it prints goes
nowhere, and what it changes here (working directory, sys.path, sys.argv) is undone after.
Every failure is one line (`Unresolved`), never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any

PROG = "gunicorn"
# How people start Gunicorn besides `gunicorn`: `python -m gunicorn` and the module the
# console script runs (`python -m gunicorn.app.wsgiapp`, as pypi/warehouse's Procfile did).
_MODULES = ("gunicorn", "gunicorn.app.wsgiapp")


class Unresolved(ValueError):
    """One line saying why the command line names no server Gunicorn would start."""


@dataclass
class Server:
    """What `gunicorn ARGS` starts: its Config, and what the checks need besides."""

    cfg: Any  # gunicorn.config.Config
    app: str | None  # the application module (command line, or the `wsgi_app` setting)
    config_file: str | None  # the config as Gunicorn was told it (`-c`), or the default one
    namespace: dict[str, Any] = field(default_factory=dict)  # the config's module-level names
    worker_class: type | None = None
    worker_class_error: str | None = None


def gunicorn_args(command: list[str]) -> list[str]:
    """Gunicorn's own arguments from a command line: what follows `gunicorn` (any path to it,
    or `python -m gunicorn`). A wrapper in front (`ddtrace-run gunicorn ...`, `exec`) is fine."""
    for i, word in enumerate(command):
        if os.path.basename(word) == PROG:
            return command[i + 1 :]
        if word == "-m" and i + 1 < len(command) and command[i + 1] in _MODULES:
            return command[i + 2 :]
    shown = " ".join(command[:3]) + (" ..." if len(command) > 3 else "")
    raise Unresolved(
        f"not a gunicorn command line: {shown!r} (expected `-- gunicorn [OPTIONS] APP`)"
    )


def resolve(args: list[str]) -> Server:
    """The server `gunicorn ARGS` starts in this directory, with this environment."""
    from gunicorn.app.base import Application  # the sidecar needs no Gunicorn otherwise
    from gunicorn.app.wsgiapp import WSGIApplication

    class Probe(WSGIApplication):
        """Gunicorn's own WSGI application up to the point of loading the app."""

        config_file: str | None = None
        namespace: dict[str, Any] = {}

        def load_config(self) -> None:
            # WSGIApplication.load_config is Application's plus a refusal when no app is named:
            # that refusal is a finding of its own (Server.app is None), not a failure to load.
            Application.load_config(self)

        def load_config_from_file(self, filename: str) -> dict[str, Any]:
            self.config_file = filename
            try:
                self.namespace = super().load_config_from_file(filename)
            except RuntimeError:  # Gunicorn's own, which names the file: "'x.py' doesn't exist"
                raise
            except Exception as e:  # `python:MODULE` that does not import, a value refused
                raise RuntimeError(f"{filename}: {type(e).__name__}: {e}") from e
            return self.namespace

    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    said = io.StringIO()
    sys.argv = [PROG, *args]
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            try:
                probe = Probe("%(prog)s [OPTIONS] [APP_MODULE]", prog=PROG)
            except SystemExit as e:
                raise Unresolved(_refusal(said.getvalue(), e.code)) from None
            except Exception as e:  # the config's own code raised something Gunicorn lets by
                raise Unresolved(f"{type(e).__name__}: {e}") from None
            server = Server(
                cfg=probe.cfg,
                app=probe.app_uri or probe.cfg.wsgi_app,
                config_file=probe.config_file,
                namespace=probe.namespace,
            )
            _load_worker_class(server)
        return server
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)


def _load_worker_class(server: Server) -> None:
    """Gunicorn's own loading of the class, where the master loads it (Arbiter.setup, after
    BaseApplication.run put `pythonpath` on sys.path)."""
    cfg = server.cfg
    if cfg.pythonpath:
        for path in cfg.pythonpath.split(","):
            if os.path.abspath(path) not in sys.path:
                sys.path.insert(0, os.path.abspath(path))
    try:
        # The property itself: read as `cfg.worker_class`, an AttributeError inside it (a module
        # without that class) falls back to Config.__getattr__, which returns the setting's text.
        server.worker_class = type(cfg).worker_class.fget(cfg)
    except (Exception, SystemExit) as e:  # util.load_class wraps the traceback in its message
        said = [line.strip() for line in str(e).strip("[]\n ").splitlines() if line.strip()]
        cause = said[-1].strip("[]") if said else f"{type(e).__name__}: {e}"
        uri = cfg.settings["worker_class"].get()
        server.worker_class_error = f"worker class {uri!r} cannot be loaded: {cause}"


def _refusal(stderr: str, code: object) -> str:
    """One line from what Gunicorn wrote before it exited: a usage error, `Error: ...`, or a
    config file's traceback (whose last line is the exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if code == 0:
        return "the command line only prints Gunicorn's help or version: it starts no server"
    failed = next((line for line in lines if line.startswith("Failed to read config file:")), None)
    invalid = next((line for line in lines if line.startswith("Invalid value for ")), None)
    last = lines[-1] if lines else f"gunicorn exited with status {code}"
    last = last.removeprefix("Error: ")
    if failed:
        return f"{failed.removeprefix('Failed to read config file: ')} raised {last}"
    if invalid:
        return f"{invalid[0].lower()}{invalid[1:]} ({last})"
    return last
