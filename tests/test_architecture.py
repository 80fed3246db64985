"""The layout stays readable: one direction of dependency, no import cycle, no module over 400 lines.

Imports are read from the source (module level and inside functions alike), so a lazy import that closes a
cycle is caught too. A new module must be given its layer here, which is where a reader learns what it may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "idanimator"
MAX_LINES = 400

# Lower layers never import higher ones (same layer: neither imports the other).
LAYERS = {
    "errors": 0,
    "registry": 0,
    "prompts": 0,
    "settings": 1,
    "files": 1,
    "console": 1,
    "weights": 2,
    "images": 2,
    "preview": 2,
    "outputs": 2,
    "adapter": 3,
    "face": 3,
    "video_writers": 1.5,  # the MP4/GIF/PNG writers, re-exported by video
    "video": 2,  # the one video reader, and the writers' public names
    "models": 4,
    "testing": 5.5,  # the package re-exports its kit
    "testing.kit": 5,
    "testing.options": 5.4,  # tiny mode's LoadOptions: the kit and the extras' tiny models
    "testing.single_file": 4,
    "testing.loras": 1,
    "testing.control_kit": 5.2,  # sized from the tiny kit's UNet
    "testing.fast_kit": 5.2,  # the tiny AnimateLCM, sized from the tiny kit
    "eval": 0,  # the evaluation package's file holds only its docstring
    "eval.spec": 1,
    "eval.reader": 2.5,
    "eval.pairing": 1,
    "eval.motion": 1,
    "eval.curricularface": 1,
    "eval.report": 2,
    "eval.clipmetrics": 3,
    "eval.embedders": 4,
    "eval.identity": 4,
    "eval.runner": 6,
    "eval.batch": 8,  # generate's batch mode: drives a loaded pipeline like the studio
    "data": 0,  # the dataset package's file holds only its docstring
    "data.labels": 1,
    "data.shots": 1,
    "data.remote": 1,
    "data.manifest": 2,
    "data.decode": 2.5,
    "data.captions": 3,
    "data.facepool": 4,
    "data.build": 5,
    "training": 0,  # the training package's file holds only its docstring
    "training.config": 1,
    "training.references": 1,
    "training.objective": 1,
    "training.data": 3,
    "training.modules": 4,
    "training.init": 4,
    "training.checkpoints": 4,
    "training.parts": 6,
    "training.validation": 7,
    "training.loop": 8,  # the train command's loop: uses every training module
    "extras": 0,  # the package's file holds only its docstring
    "extras.spec": 2,
    "extras.conditions": 3,  # condition images from keyframes and driving videos
    "extras.control_models": 4.5,  # uses models' per-frame norms
    "extras.control": 5,
    "extras.fast": 4.5,  # AnimateLCM: loads its motion adapter with models' loader
    "extras.freeinit": 1,
    "extras.longvideo": 2,  # FreeNoise windows; the time estimate counts FreeInit's passes
    "extras.lorafiles": 3,
    "extras.loras": 4,
    "extras.apply": 5,  # imports each option's module (layer 5 or below) by name
    "request": 2,  # GenerationRequest: one request, validated once
    "options": 3,  # the page's choices beyond the release -> Extras
    "pipeline": 6,
    "service": 7,
    "studio": 8,
    "cli": 9.5,  # the package assembles the commands' parsers
    "cli.common": 8.5,
    "cli.generate": 9,
    "cli.measure": 9,
    "cli.data": 9,
    "cli.weights": 9,
    "__main__": 10,
    "__init__": 10,  # the package: lazy re-exports of the public API
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The idanimator modules a file imports, anywhere in it (relative and absolute imports)."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("idanimator"):
                target = node.module.removeprefix("idanimator").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import registry` imports a module
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in LAYERS else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("idanimator."):
                    found.add(alias.name.removeprefix("idanimator."))
    return {m for m in found if m and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYERS)) == []


def test_nothing_imports_upward_or_sideways():
    wrong = [
        f"{source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS.get(target)})"
        for source, targets in graph().items()
        for target in targets
        if target not in LAYERS or LAYERS[target] >= LAYERS[source]
    ]
    assert wrong == []


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in edges.get(node, ()):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*trail, node, target])
            if target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_lazy_imports():
    """The parser itself: an import inside a function counts."""
    source = PACKAGE / "pipeline.py"
    assert {"models", "face", "testing"} <= imports_of(source)  # all three are imported inside methods


def test_no_module_is_over_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_library_never_imports_gradio():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in {"gradio", "spaces"} for n in names), path.name
