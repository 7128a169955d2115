"""The tree shows the two processes: nothing crosses between them except the contract."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "monitor"
SIDES = ("hooks", "contract", "sidecar")
# Which of our subpackages each side may import.
ALLOWED = {
    "hooks": {"hooks", "contract"},
    "contract": {"contract"},
    "sidecar": {"sidecar", "contract"},
}


def _imports(path: Path) -> set[str]:
    """Every `monitor.*` module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import; name the side explicitly")
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m == "monitor" or m.startswith("monitor.")}


def _side(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SIDES else None


def test_every_module_belongs_to_one_side():
    loose = [
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob("*.py") if p.name != "__init__.py"
    ]
    assert loose == [], "modules outside hooks/, contract/ and sidecar/"
    for side in SIDES:
        assert (PACKAGE / side / "__init__.py").read_text().startswith('"""'), side


def test_no_import_crosses_the_boundary():
    crossings = []
    for side in SIDES:
        for path in sorted((PACKAGE / side).rglob("*.py")):
            for module in _imports(path):
                target = _side(module)
                if module == "monitor" or target is None:
                    # `from monitor import x` names a submodule: x must be on an allowed side.
                    if module.startswith("monitor.") and module.split(".")[1] not in SIDES:
                        if module.split(".")[1] != "__version__":
                            crossings.append((path, module))
                    continue
                if target not in ALLOWED[side]:
                    crossings.append((path.relative_to(ROOT).as_posix(), module))
    assert crossings == []


def test_the_gunicorn_config_imports_only_the_gunicorn_side():
    sides = {_side(m) for m in _imports(ROOT / "gunicorn.conf.py")}
    assert sides <= {"hooks", "contract"}, sides


def test_loading_the_hooks_loads_nothing_of_the_sidecar():
    """What the master actually imports, not what the source says: a fresh interpreter."""
    code = (
        "import sys, monitor.hooks\n"
        "print(sorted(m for m in sys.modules if m.startswith('monitor.sidecar')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
