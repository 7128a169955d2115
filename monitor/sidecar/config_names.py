"""Names in a Gunicorn config that Gunicorn silently ignores, though they look meant for it.

Gunicorn reads the module-level names of a config that are settings and ignores every other
name without a word (app/base.py: "Ignore unknown names"): `keep_alive = 75`, `log_level`,
`access_logfile` (the command line's spellings), `grateful_timeout`, `worker = 2` all do
nothing, and the server runs on the defaults. A config also holds its own helper variables
(`cores`, `use_bind`, `env = environ.Env()`), which are fine. What tells them apart, checked
against real projects' configs (tests/real_configs/, and the wider sample in the README):

- only a name that nothing else in the config reads: a helper is read by the setting it feeds
  (`loglevel = use_loglevel`). Reading anywhere counts, module level or a function's body, and
  so does a listing in `__all__` (another config star-imports the name);
- only a name spelled like a setting: the same letters as a setting or as one of Gunicorn's
  long flags, ignoring case, `_` and `-` (`keep_alive`, `log_level`, `TIMEOUT`, `python_path`),
  or within difflib's ratio CLOSE of one (`grateful_timeout`, `worker_conncetions`);
- never an underscored name, a module, a class or an imported name; a function only when it is
  spelled like a server hook (`def post_froks(server, worker)`: Gunicorn never calls it).

A setting annotated but never assigned (`workers: 4` for `workers = 4`) binds nothing: found too.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLOSE = 0.8  # difflib ratio: `on_start` is 0.82 from `on_starting`, `grateful_timeout` 0.93
MAX_SOURCE = 1 << 20  # bytes of a config's source read to see which names it reads
HOOKS = "Server Hooks"  # the section of Gunicorn's settings that holds the hooks


@dataclass(frozen=True)
class Misnamed:
    name: str
    meant: str  # the Gunicorn setting it looks meant for
    why: str


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _spellings(settings: Mapping[str, Any], hooks: bool) -> dict[str, str]:
    """{normalized spelling: setting} for each setting's name and long command-line flags
    (`--keep-alive` spells `keepalive`), of the hooks only or of the rest."""
    found: dict[str, str] = {}
    for name, setting in settings.items():
        if (setting.section == HOOKS) == hooks:
            for flag in setting.cli or ():
                if flag.startswith("--"):
                    found.setdefault(_norm(flag), name)
            found[_norm(name)] = name
    return found


def _source_names(namespace: Mapping[str, Any]) -> tuple[set[str], set[str]] | None:
    """(names read anywhere, names bound by an import) in the config's source; None when its
    source cannot be read (a config from a .pyc)."""
    path = namespace.get("__file__")
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(MAX_SOURCE))
    except (OSError, SyntaxError, ValueError):
        return None
    read, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
            read.add(node.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            read.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    listed = namespace.get("__all__")
    if isinstance(listed, list | tuple):
        read.update(n for n in listed if isinstance(n, str))
    return read, imported


def find(namespace: Mapping[str, Any], settings: Mapping[str, Any]) -> list[Misnamed]:
    """The names of a config (its module namespace, as Gunicorn loaded it) that Gunicorn
    ignores but that look meant for it; `settings` is Gunicorn's Config.settings."""
    names = _source_names(namespace)
    read, imported = names if names is not None else (set(), set())
    plain, hooks = _spellings(settings, hooks=False), _spellings(settings, hooks=True)
    found = []
    for name, value in namespace.items():
        if name in settings or name.startswith("_") or name in read or name in imported:
            continue
        if inspect.ismodule(value) or inspect.isclass(value):
            continue
        match = _match(name, hooks if inspect.isfunction(value) else plain)
        if match is not None:
            found.append(_explain(name, value, settings[match[0]], match[1]))
    for name in namespace.get("__annotations__", {}) or {}:
        if name in settings and name not in namespace:
            found.append(
                Misnamed(
                    name,
                    name,
                    f"`{name}: ...` is an annotation and sets nothing: write `{name} = ...`",
                )
            )
    return found


def _match(name: str, spellings: dict[str, str]) -> tuple[str, bool] | None:
    """(the setting `name` is spelled like, whether exactly), or None."""
    key = _norm(name)
    if key in spellings:
        return spellings[key], True
    close = difflib.get_close_matches(key, spellings, n=1, cutoff=CLOSE)
    return (spellings[close[0]], False) if close else None


def _explain(name: str, value: Any, setting: Any, exact: bool) -> Misnamed:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    if inspect.isfunction(value):
        head = f"`def {name}` is no server hook: Gunicorn never calls it"
    else:
        head = f"`{name} = {shown}` is not a Gunicorn setting and nothing reads it: ignored"
    flags = [f for f in setting.cli or () if f.startswith("--") and _norm(f) == _norm(name)]
    flag = flags[0] if flags else ""
    if exact and flag and _norm(setting.name) != _norm(name):
        tail = f"`{flag}` is the command line's flag; in a config the setting is `{setting.name}`"
    elif exact:
        tail = f"the setting is `{setting.name}`"
    else:
        tail = f"did you mean `{setting.name}`?"
    return Misnamed(name, setting.name, f"{head}; {tail}")
