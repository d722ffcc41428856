"""No unsafe loading in the package or the benchmark scripts: no pickle, no ``torch.load`` that may
unpickle arbitrary objects, no remote code by default.

Models, checkpoints and artifacts travel between clients and servers as safetensors; loading a pickle
from a peer would let it run code on the loading machine. The scan parses the source with ``ast``, so
a mention in a comment or docstring does not count, and import aliases are followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "src" / "fedp2eft", REPO / "benchmarks"]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
PICKLE_LOADERS = {"load", "loads", "Unpickler"}
TORCH_LOADERS = {"torch.load", "torch.serialization.load"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name it was imported as (``import torch as t`` gives ``t -> torch``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value, names)):
        return f"{base}.{node.attr}"
    return None


def _call_problem(call: ast.Call, names: dict[str, str]) -> str | None:
    target = _dotted(call.func, names) or ""
    module, _, function = target.rpartition(".")
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    if module.split(".")[0] in PICKLE_MODULES and function in PICKLE_LOADERS:
        return f"{target}() unpickles"
    if target in TORCH_LOADERS and not _is_true(keywords.get("weights_only")):
        return f"{target}() without weights_only=True"
    if _is_true(keywords.get("trust_remote_code")):
        return "trust_remote_code=True"
    if _is_true(keywords.get("allow_pickle")):
        return "allow_pickle=True"
    return None


def _default_problems(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
    pairs += [(arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults) if default]
    return [f"{function.name}({arg.arg}=True)" for arg, default in pairs
            if arg.arg in {"trust_remote_code", "allow_pickle"} and _is_true(default)]


def unsafe_loading(source: str) -> list[str]:
    """What in ``source`` could unpickle or run remote code, as 'line N: why' strings."""
    tree = ast.parse(source)
    names = _imported_names(tree)
    problems: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [(node.lineno, f"imports {m}") for m in modules if m.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.Call) and (problem := _call_problem(node, names)):
            problems.append((node.lineno, problem))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            problems += [(node.lineno, problem) for problem in _default_problems(node)]
        elif isinstance(node, ast.Dict):
            problems += [(node.lineno, "trust_remote_code: True") for key, value in zip(node.keys, node.values)
                         if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value)]
    return [f"line {line}: {why}" for line, why in sorted(problems)]


@pytest.mark.parametrize("snippet, expected", [
    ("import pickle", "imports pickle"),
    ("import cloudpickle as cp", "imports cloudpickle"),
    ("from dill import loads", "imports dill"),
    ("import pickle\npickle.loads(b'')", "pickle.loads() unpickles"),
    ("import torch\ntorch.load('x.pt')", "torch.load() without weights_only=True"),
    ("import torch as t\nt.load('x.pt', weights_only=False)", "torch.load() without weights_only=True"),
    ("from torch import load\nload('x.pt')", "torch.load() without weights_only=True"),
    ("m = AutoModel.from_pretrained('x', trust_remote_code=True)", "trust_remote_code=True"),
    ("def build(path, trust_remote_code=True): ...", "build(trust_remote_code=True)"),
    ("def build(path, *, trust_remote_code=True): ...", "build(trust_remote_code=True)"),
    ("OPTIONS = {'trust_remote_code': True}", "trust_remote_code: True"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle=True"),
])
def test_scanner_flags_unsafe_loading(snippet: str, expected: str) -> None:
    assert any(problem.endswith(expected) for problem in unsafe_loading(snippet)), unsafe_loading(snippet)


def test_scanner_accepts_safe_loading_and_mere_mentions() -> None:
    source = '''
"""Never call pickle.load or torch.load('x') here; trust_remote_code=True is refused."""
import torch
from safetensors.torch import load_file
# import pickle
weights = torch.load("x.pt", weights_only=True)
tensors = load_file("x.safetensors")
model = AutoModel.from_pretrained("x", trust_remote_code=False)
def build(path, trust_remote_code=False): ...
'''
    assert unsafe_loading(source) == []


def test_package_has_no_unsafe_loading() -> None:
    files = sorted(path for root in SCANNED for path in root.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package, not an empty folder
    problems = [f"{path.relative_to(REPO)} {problem}" for path in files
                for problem in unsafe_loading(path.read_text(encoding="utf-8"))]
    assert problems == []
