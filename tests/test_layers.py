"""Which of the project's packages may import which (the dependency direction of the design): the contract
imports none of them; the kiosk core only the contract; the kiosk UI only the kiosk core; the hardware layer
only the kiosk's ports (events, port interfaces, typed config); sync the contract and the kiosk core; the
cloud only the contract. Read from the source with ``ast`` (imports inside functions count too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "kiosk", "hal", "sync", "cloud")

# folder -> the project modules it may import (a module, or a package and everything in it)
ALLOWED = {
    "contract": ("contract",),
    "kiosk/ui": ("kiosk.ui", "kiosk.events", "kiosk.session", "kiosk.calibration", "kiosk.config", "kiosk.ports",
                 "kiosk.maintenance"),
    "kiosk": ("kiosk", "contract"),
    "hal": ("hal", "kiosk.ports", "kiosk.events", "kiosk.config"),
    "sync": ("sync", "contract", "kiosk"),
    "cloud": ("cloud", "contract"),
}
NOT_IN = {"kiosk": ("kiosk.ui",), "sync": ("kiosk.ui",)}     # the kiosk core and sync never reach into the UI
# The simulation is wired like main.py wires the real machine: these two build and drive a whole simulated
# dispenser (hardware plus runtime) for tests, benchmarks and the desktop run.
EXCEPTIONS = {("hal/machine.py", "kiosk.runtime"), ("hal/sim_users.py", "kiosk.runtime")}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in out if m.split(".")[0] in PACKAGES]


def _folder(rel: str) -> str:
    return "kiosk/ui" if rel.startswith("kiosk/ui/") else rel.split("/")[0]


def _within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def violations() -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            folder = _folder(rel)
            for line, module in _imports(path):
                base = module.rsplit(".", 1)[0] if module.count(".") > 1 else module
                ok = _within(module, ALLOWED[folder]) or _within(base, ALLOWED[folder])
                if ok and _within(module, NOT_IN.get(folder, ())):
                    ok = False
                if not ok and not any(rel == f and _within(module, (m,)) for f, m in EXCEPTIONS):
                    bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_the_dependency_direction_holds():
    assert violations() == []


def test_the_check_finds_a_wrong_import(tmp_path, monkeypatch):
    """The check is not vacuous: a cloud module importing the kiosk, or the contract importing sync, is found."""
    import tests.test_layers as layers
    fake = tmp_path / "root"
    for pkg in PACKAGES:
        (fake / pkg).mkdir(parents=True)
    (fake / "cloud" / "x.py").write_text("from kiosk.session import DispenserCore\n")
    (fake / "contract" / "y.py").write_text("def f():\n    import sync.link\n")
    (fake / "kiosk" / "z.py").write_text("from kiosk.ui.present import present\n")
    (fake / "hal" / "ok.py").write_text("from kiosk.events import Event\n")
    monkeypatch.setattr(layers, "ROOT", fake)
    found = sorted(layers.violations())
    assert found == ["cloud/x.py:1 imports kiosk.session.DispenserCore", "contract/y.py:2 imports sync.link",
                     "kiosk/z.py:1 imports kiosk.ui.present.present"], found
