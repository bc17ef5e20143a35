"""The method registry (``models.methods``) and the catalog of shipped methods (``models.catalog``).

Every registered name resolves to a method of that name, every saved-model loader to a method,
and the registry stays one-way: it imports no family, and no import cycle runs through it.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from models import methods
from models.catalog import create_method, list_aligners, list_methods, load_aligner

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_name_resolves_to_a_method_of_that_name(name):
    m = create_method(name)
    assert m.name == name
    assert callable(m.fit)


def test_the_catalog_holds_the_shipped_methods_each_with_a_saved_model_loader():
    assert {"dprc", "rasl", "pssv", "tgrasta", "lsc"} <= set(list_methods())
    assert set(list_aligners()) <= set(list_methods())
    assert {"dprc", "rasl", "pssv", "tgrasta", "lsc"} <= set(list_aligners())
    assert all(callable(f) for f in methods.registered_aligners().values())


def test_the_look_ups_that_moved_to_the_catalog_say_so():
    with pytest.raises(ImportError, match="now models.catalog.create_method"):
        from models.methods import create_method  # noqa: F401


def test_unknown_names_are_named_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of .*dprc"):
        create_method("nope")
    (tmp_path / "config.json").write_text('{"method": "nope"}')
    with pytest.raises(ValueError, match="'nope' has no saved-model support"):
        load_aligner(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_aligner(tmp_path / "missing")


def test_a_taken_name_cannot_be_taken_by_another_factory(monkeypatch):
    monkeypatch.setattr(methods, "_KINDS", {k: dict(v) for k, v in methods._KINDS.items()})  # changes go to a copy

    def impostor(**_):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="method 'dprc' is registered already"):
        methods.register_method("dprc")(impostor)
    assert methods.registered_methods()["dprc"] is not impostor
    again = methods.registered_methods()["lsc"]
    assert methods.register_method("lsc")(again) is again  # the same definition again: harmless
    methods.register_method("test-only")(impostor)
    assert methods.registered_methods()["test-only"] is impostor
    methods.register_method("dprc", kind="pair")(impostor)  # names are per kind of task
    assert methods.registered_methods("pair")["dprc"] is impostor


def test_the_registry_imports_no_family():
    code = ("import sys, models.methods\n"
            "print(sorted(m for m in sys.modules if m.startswith(('models.dprc', 'models.baselines', "
            "'models.catalog'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (function-level imports too)."""
    files = {}
    for p in (ROOT / package).rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = p
    graph = {}
    for name, p in files.items():
        base = name if p.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = base.split(".")[:len(base.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(parts + ([node.module] if node.module else []))
                subs = {f"{mod}.{a.name}" for a in node.names} & files.keys()
                out.update(subs or {mod})
        graph[name] = {m for m in out if m in files and m != name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", ["models.methods", "models.catalog"])
def test_no_import_cycle_runs_through_the_registry(module):
    graph = _import_graph("models")
    assert module not in _reaches(graph, module)
    if module == "models.methods":  # and it reaches no family at all
        assert not {m for m in _reaches(graph, module) if m.startswith(("models.dprc", "models.baselines"))}
