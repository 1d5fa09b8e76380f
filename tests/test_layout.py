"""The package layout: subpackages import only the layers below them, no module imports the CLI, and no two
modules import each other (directly or round a loop). Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mdsd3_cli"
LAYERS = ["util", "model", "recipe", "pipeline", "dataset", "export", "generate", "train", "evaluate", "calibrate"]
"""Subpackages from the bottom: each may import itself and the ones before it, never one after it."""


def _module_names() -> dict[str, Path]:
    """Dotted name of every module in the package (a package by its own name) -> its file."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (functions and TYPE_CHECKING blocks
    included); `mdsd3_cli` itself for a name imported from the package root."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("mdsd3_cli") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    names = _module_names()
    return {name: _imports(name, path, set(names)) for name, path in names.items()}


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: mdsd3_cli.model.heads -> model."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mdsd3_cli"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_layers_are_the_subpackages_there_are() -> None:
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


def test_no_subpackage_imports_a_later_layer_or_a_top_level_module() -> None:
    upward = []
    for module, imported in _graph().items():
        if _unit(module) not in LAYERS:
            continue
        for target in imported:
            allowed = LAYERS[: LAYERS.index(_unit(module)) + 1]
            if _unit(target) not in allowed:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_only_the_entry_point_imports_the_cli() -> None:
    importers = sorted(module for module, imported in _graph().items() if "mdsd3_cli.cli" in imported)
    assert importers == ["mdsd3_cli.__main__"]


def test_no_import_cycle_between_subpackages_or_modules() -> None:
    graph = _graph()
    units: dict[str, set[str]] = {}
    for module, imported in graph.items():
        units.setdefault(_unit(module), set()).update(
            _unit(target) for target in imported if _unit(target) != _unit(module)
        )
    assert _cycle(units) is None
    assert _cycle(graph) is None


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The graph reader finds real edges (so the checks above can fail): generate.run imports the pipeline, and
    a made-up loop is reported."""
    graph = _graph()
    assert "mdsd3_cli.pipeline.pipeline" in graph["mdsd3_cli.generate.run"]
    assert "mdsd3_cli.evaluate.report" in graph["mdsd3_cli.evaluate.run"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _root_importers(graph: dict[str, set[str]]) -> list[str]:
    """Modules of the subpackages that import a name from the package root `mdsd3_cli` (which sits above them all)."""
    return sorted(module for module, imported in graph.items() if _unit(module) in LAYERS and "mdsd3_cli" in imported)


def test_no_subpackage_imports_the_package_root() -> None:
    assert _root_importers(_graph()) == []


def test_the_root_check_sees_an_upward_import(tmp_path: Path) -> None:
    """Fed made-up modules, the check reports each way of importing the root, and not an import of its layer."""
    known = set(_module_names())
    fakes = {
        "from mdsd3_cli import __version__\n": True,
        "import mdsd3_cli\n": True,
        "def f():\n    from ... import Synthesizer\n": True,
        "from mdsd3_cli.util.version import __version__\n": False,
    }
    for index, (text, upward) in enumerate(fakes.items()):
        path = tmp_path / f"fake{index}.py"
        path.write_text(text)
        name = f"mdsd3_cli.model.presets.fake{index}"
        assert _root_importers({name: _imports(name, path, known)}) == ([name] if upward else []), text


def test_one_image_walker_and_one_to_rgb() -> None:
    """Folders of images are walked by util.images.walk_images only (verify's orphan listing walks every file,
    not images) and pictures become RGB in util.images.to_rgb only."""
    walkers, converters = [], []
    for name, path in _module_names().items():
        text = path.read_text(encoding="utf-8")
        if "os.walk(" in text and name not in ("mdsd3_cli.util.images", "mdsd3_cli.dataset.verify"):
            walkers.append(name)
        if ('.convert("RGB")' in text or "def _to_rgb" in text) and name != "mdsd3_cli.util.images":
            converters.append(name)
    assert walkers == [] and converters == []


def test_train_and_calibrate_run_the_model_through_the_pipeline_not_generate() -> None:
    importers = sorted(
        f"{module} imports {target}"
        for module, imported in _graph().items()
        if _unit(module) in ("train", "calibrate")
        for target in imported
        if _unit(target) == "generate"
    )
    assert importers == []


def test_one_home_for_running_the_model() -> None:
    """The sampler is built by the pipeline only, inputs are fitted by pipeline.inputs only and seeds are drawn by
    pipeline.requests only."""
    homes = {
        "MDSD3Sampler(": "mdsd3_cli.pipeline.pipeline",
        "load_image(": "mdsd3_cli.pipeline.inputs",
        "sample_seed(": "mdsd3_cli.pipeline.requests",
    }
    elsewhere = []
    for name, path in _module_names().items():
        text = path.read_text(encoding="utf-8")
        for call, home in homes.items():
            if call in text and name not in (home, "mdsd3_cli.util.images", "mdsd3_cli.model.sampler"):
                elsewhere.append(f"{name}: {call}")
    assert elsewhere == []
