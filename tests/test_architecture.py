"""docs/architecture.md kept true: the floors and their import rule, and the file list of each "how to add"."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import fedp2eft

PACKAGE = Path(fedp2eft.__file__).parent
# docs/architecture.md's floors: a module imports only from its own floor and the ones below
FLOORS = {"errors": 1, "cache": 1, "config_yaml": 1, "logs": 1, "interrupt": 1, "__init__": 1, "data": 2, "models": 2,
          "core": 3, "fl": 4, "experiment": 5, "benchmark": 6, "commands": 7, "cli": 7}


def floor(module: str) -> int:
    """The floor of ``fedp2eft.<top>...``."""
    return FLOORS[module.split(".")[1]]


def imports(path: Path) -> list[str]:
    """Every fedp2eft module ``path`` imports, at module level or inside a function (``from a import b`` counts as
    ``a`` and ``a.b``, since ``b`` may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("fedp2eft.")]


def test_every_module_imports_only_from_its_floor_or_below():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = "fedp2eft." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = floor(module) if module != "fedp2eft.__init__" else 1
        offenders += [f"{module} (floor {own}) imports {name} (floor {floor(name)})"
                      for name in imports(path) if floor(name) > own]
    assert not offenders


def test_the_flower_layer_knows_no_method_and_no_two_of_its_modules_import_each_other():
    """Below the floor rule, fl/ also stays out of the method registry (core.methods): tasks reach it by name through
    the ``fedp2eft.tasks`` entry point, not by an import, and not by a module path written into it either."""
    folder = PACKAGE / "fl"
    graph = {path.stem: imports(path) for path in folder.glob("*.py")}
    assert not {module: names for module, names in graph.items()
                if any(name.startswith(("fedp2eft.core.methods", "fedp2eft.experiment")) for name in names)}
    local = {module: {name.split(".")[2] for name in names if name.startswith("fedp2eft.fl.")} & set(graph)
             for module, names in graph.items()}
    assert not [(a, b) for a in local for b in local[a] if a in local.get(b, ())]
    assert "fedp2eft.experiment" not in (folder / "tasks.py").read_text()


def test_a_method_is_one_folder_and_one_registry_entry():
    """Each method's declaration, personalization and own settings live in its folder under core/methods/; its
    learning rate is a setting it reads (shared or its own) and one that the protocol's profile sets."""
    from dataclasses import fields

    from fedp2eft.benchmark.config import load_profile
    from fedp2eft.core.methods import METHODS, MethodSpec
    from fedp2eft.core.personalization import PersonalizeConfig

    folder = PACKAGE / "core" / "methods"
    personalize_section = load_profile("full")["personalize"]
    declared = {}  # method name -> the folder under core/methods/ that declares it
    for path in folder.glob("*/__init__.py"):
        module = importlib.import_module(f"fedp2eft.core.methods.{path.parent.name}")
        for value in vars(module).values():
            if isinstance(value, MethodSpec):
                declared[value.name] = path.parent
    assert set(declared) == set(METHODS)
    registry = (folder / "__init__.py").read_text()
    assert all(f"{home.name}." in registry for home in declared.values())
    # beside the folders only the registry and what several methods share (the peers' declarations)
    assert sorted(path.name for path in folder.glob("*.py")) == ["__init__.py", "prefix.py", "registry.py"]
    for name, spec in METHODS.items():
        if spec.settings is not None:
            assert Path(inspect.getsourcefile(spec.settings)).is_relative_to(declared[name]), name
        if spec.lr_field is not None:
            own = {item.name for item in fields(spec.settings)} if spec.settings is not None else set()
            assert spec.lr_field in set(PersonalizeConfig.__dataclass_fields__) | own
            assert spec.lr_field in personalize_section


def test_a_dataset_is_one_loader_module_and_one_registry_entry():
    from fedp2eft.data.registry import LOADERS

    for name, loader in LOADERS.items():
        assert Path(inspect.getsourcefile(loader)).parent == PACKAGE / "data", name


def test_an_embedded_model_is_one_module_and_one_registry_entry():
    import importlib

    from fedp2eft.models.registry import EMBEDDED

    modules = [importlib.import_module(f"fedp2eft.models.{path.stem}")
               for path in (PACKAGE / "models").glob("*_embedded.py")]
    for name, model in EMBEDDED.items():
        assert any(model in vars(module).values() for module in modules), f"{name} is not declared in a *_embedded.py"


def test_a_base_algorithm_is_declared_in_pfl_and_base_training():
    from fedp2eft.core.base_training import BASE_ALGORITHMS
    from fedp2eft.core.pfl import ALGORITHM_SETTINGS, base_model_task

    assert set(ALGORITHM_SETTINGS) == set(BASE_ALGORITHMS) - {"fedavg"}
    table = inspect.getsource(base_model_task)
    assert all(f'"{algorithm}"' in table for algorithm in BASE_ALGORITHMS)
