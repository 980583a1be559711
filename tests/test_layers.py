"""The package's import contract: stages sit in layers and no module imports a higher layer or
another module's private names.

A module may import its own package, and any package of a lower layer; two packages of the
same layer do not import each other. Imports inside functions count the same as top-level
ones (they are deferred, not absent). Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. The key is the first name under quota_compile (a package or a top-level module);
# ``passes`` is the top-level graph-pass folder.
LAYERS: list[set[str]] = [
    {"errors"},
    {"environment", "config"},
    {"quant"},
    {"kernels"},
    {"models", "data"},
    {"pruning"},
    {"passes"},
    {"capture"},
    {"bundle"},
    {"runtime"},
    {"calibration"},
    {"export"},
    {"verify"},
    {"flavours"},
    {"core"},
    {"commands"},
    {"cli", "config_reference"},
    {"__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str | None:
    """The layer key of a dotted module name, or None for a module outside the project."""
    parts = module.split(".")
    if parts[0] == "passes":
        return "passes"
    if parts[0] != "quota_compile":
        return None
    return parts[1] if len(parts) > 1 else ""


def _sources() -> list[tuple[str, Path]]:
    found = []
    for folder in ("quota_compile", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # `from pkg import module` imports a module: judge it as that module
            for name in names:
                sub = f"{target}.{name}"
                if (ROOT / (sub.replace(".", "/") + ".py")).exists() or (ROOT / sub.replace(".", "/")).is_dir():
                    out.append((node.lineno, sub, []))
                else:
                    out.append((node.lineno, target, [name]))
    return out


SOURCES = _sources()


def test_every_module_has_a_layer():
    missing = sorted({_unit(m) for m, _ in SOURCES} - set(LAYER_OF) - {""})
    assert not missing, f"add these to LAYERS in tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_layer_or_a_sibling_package():
    wrong = []
    for module, path in SOURCES:
        own = _unit(module)
        if own == "":
            continue
        for line, target, _ in _imports(module, path):
            other = _unit(target)
            if other is None or other == "" or other == own:
                continue
            if LAYER_OF[other] >= LAYER_OF[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}, layer {LAYER_OF[own]}) imports {target} "
                             f"({other}, layer {LAYER_OF[other]})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for module, path in SOURCES:
        for line, target, names in _imports(module, path):
            if _unit(target) is None:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
            if target.rpartition(".")[2].startswith("_") and not target.rpartition(".")[2].startswith("__"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_commands_do_not_import_each_other():
    """compile, eval and bench stand side by side on the shared core (quota_compile.core)."""
    wrong = []
    for module, path in SOURCES:
        if not module.startswith("quota_compile.commands."):
            continue
        for line, target, _ in _imports(module, path):
            if target.startswith("quota_compile.commands.") and target != module:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "commands importing commands:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from quota_compile.commands.compile import compile_model\n", True),  # verify -> commands: up
        ("from quota_compile.quant import ops\n", False),  # verify -> quant: down
        ("from quota_compile.verify.gate import verify\n", False),  # same package
    ],
)
def test_the_checker_itself_tells_up_from_down(tmp_path, monkeypatch, source, expected):
    """The layering check flags an upward import and passes downward and same-package ones
    (a checker that found nothing would pass any code)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    [(line, target, _)] = _imports("quota_compile.verify.probe", path)
    up = LAYER_OF[_unit(target)] >= LAYER_OF["verify"] and _unit(target) != "verify"
    assert up is expected


def test_pyproject_installs_every_package():
    """pyproject.toml lists the packages by hand (the passes folder is mapped into the
    namespace); a new subpackage missing from the list would be absent from a wheel."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'^\s*"(quota_compile[\w.]*)",\s*$', text.split("packages = [", 1)[1].split("]", 1)[0], re.M))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quota_compile").rglob("__init__.py")}
    assert listed == folders | {"quota_compile.passes"}


def _calls(path: Path) -> set[str]:
    """The names a module calls: ``f(...)`` gives ``f``, ``x.f(...)`` gives ``.f``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                out.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                out.add(f".{node.func.attr}")
    return out


def _method_calls(path: Path, cls: str, method: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    [klass] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    [fn] = [n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == method]
    return {f".{n.func.attr}" if isinstance(n.func, ast.Attribute) else n.func.id
            for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


# What only the workbench's build does: a command that did any of it would build graphs by a
# path of its own, beside the shared one.
BUILD_STEPS = {"decide_pruning", "calibrate", "build_programs", "trace_programs", "export_onnx", "export_semantic", "expand_to_onnx", "apply_passes"}


@pytest.mark.parametrize("command, entry", [("compile", ".build"), ("evaluate", ".build_into"), ("bench", ".build_into")])
def test_the_commands_build_through_the_one_workbench_build(command, entry):
    """compile, eval and bench build their graphs through Workbench.build (eval and bench
    through build_into, which calls build and saves one flavour), never by hand."""
    path = ROOT / "quota_compile" / "commands" / f"{command}.py"
    imported = {(target, name) for _, target, names in _imports(f"quota_compile.commands.{command}", path) for name in names}
    assert ("quota_compile.core.workbench", "Workbench") in imported
    calls = _calls(path)
    assert entry in calls
    names = {name for _, _, names in _imports(f"quota_compile.commands.{command}", path) for name in names}
    steps = (names | {c.lstrip(".") for c in calls}) & BUILD_STEPS
    if command == "evaluate":  # its local benchmarks answer with the unpruned model's eager programs (no graphs)
        steps -= {"build_programs"}
    assert not steps, f"commands/{command}.py builds by hand: {sorted(steps)}"
    core = ROOT / "quota_compile" / "core" / "workbench.py"
    assert ".build" in _method_calls(core, "Workbench", "build_into")
    assert {"trace_programs", "export_semantic", "expand_to_onnx", ".decide", ".lower"} <= _method_calls(core, "Workbench", "build")
