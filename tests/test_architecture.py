"""The layout stays readable: one direction of dependency, no import cycle, no module over 400 lines (a
script read top to bottom, such as the train command's, up to 900).

Imports are read from the source (module level and inside functions alike), so a lazy import that closes a
cycle is caught too. A new module must be given its layer here, which is where a reader learns what it may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "idanimator"
MAX_LINES = 400
# Scripts read in one sitting, top to bottom, as nanoGPT's train.py and diffusers' training examples are: a
# longer file there is easier to follow than a map of small modules (app.py is outside the package anyway).
SCRIPTS = {"training.train"}
MAX_SCRIPT_LINES = 900

# Every module's layer, a whole number: one more than the highest layer among the modules it imports (0 for a
# module that imports none of ours), so a newcomer can work out where a new module goes, and a lower layer never
# imports a higher one. Grouped by package; the comment says what sits on that layer.
LAYERS = {
    # the foundations: no import of ours
    "errors": 0,
    "registry": 0,  # every Hub id and file name
    "prompts": 0,
    "console": 0,
    "preview": 0,
    "settings": 1,  # every default and limit
    "files": 1,  # the one atomic write
    "images": 1,
    "weights": 1,  # names -> files, Hub ids
    "outputs": 1,
    "request": 2,  # GenerationRequest: one request, validated once
    "adapter": 2,  # the face adapter, the official checkpoint's layer map
    "face": 2,
    "arcface": 2,  # ArcFace (arcface_torch's iresnet) and the differentiable crop onto its template
    "video_writers": 2,
    "video": 3,  # the one video reader (and the writers' names)
    "models": 3,  # loading each part, assembling the diffusers pipeline
    # options beyond the release, one module each
    "extras": 0,  # the package's file holds only its docstring
    "extras.freeinit": 0,
    "extras.longvideo": 1,
    "extras.lorafiles": 2,
    "extras.loras": 3,
    "extras.conditions": 4,
    "extras.control_models": 4,
    "extras.fast": 4,
    "extras.control": 5,
    # tiny mode: the random tiny kit in real layouts
    "tiny.lora_kit": 0,
    "tiny.single_file": 2,
    "tiny.kit": 4,
    "tiny.control_kit": 5,
    "tiny.fast_kit": 5,
    "tiny.arcface_kit": 5,  # the identity loss's tiny ArcFace
    "tiny.load": 6,  # load_options: the one place tiny mode is chosen
    "tiny": 7,  # the package re-exports its kit and load_options
    # generating
    "pipeline": 8,
    "service": 9,
    "estimate": 0,  # SpeedModel: the time estimate learnt from the videos made here
    "studio": 10,  # the app's engine
    "batch": 10,  # generate's batch mode
    # build-dataset
    "data": 0,  # the package's file holds only its docstring
    "data.shots": 0,
    "data.labels": 1,
    "data.remote": 1,
    "data.captions": 2,
    "data.manifest": 2,
    "data.layout": 2,  # the videos' keys, shards and locks of build-dataset runs into one OUT
    "data.facepool": 3,
    "data.decode": 4,
    "data.build": 5,
    # train
    "training": 0,  # the package's file holds only its docstring
    "training.config": 1,  # every setting, checked before torch is imported
    "training.identity_loss": 3,  # x0 estimate -> VAE -> template crop -> ArcFace
    "training.adapter_training": 3,
    "training.dataset": 4,
    "training.train": 9,  # the script: frozen models, loss, loop, checkpoints, validation videos
    # eval: the metrics
    "eval": 0,  # the package's file holds only its docstring
    "eval.motion": 0,
    "eval.curricularface": 2,
    "eval.metrics": 1,  # the metrics' names
    "eval.report": 2,
    "eval.embedders": 3,
    "eval.pairing": 4,
    "eval.reader": 4,
    "eval.clipmetrics": 5,
    "eval.identity": 5,
    "eval.runner": 6,
    # the command line and the package
    "cli.common": 0,
    "cli.evaluate": 7,
    "cli.model_files": 8,
    "cli.build_and_train": 10,
    "cli.generate": 11,
    "cli": 12,  # the package assembles the commands' parsers
    "__main__": 13,
    "__init__": 9,  # the package: lazy re-exports of the public API
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


def test_each_layer_is_one_above_the_highest_import():
    """The rule a newcomer predicts layers by; the message says which number a module should have."""
    edges = graph()
    expected = {
        name: 1 + max((LAYERS[t] for t in targets if t in LAYERS), default=-1) for name, targets in edges.items()
    }
    wrong = {name: f"{LAYERS.get(name)} -> {layer}" for name, layer in expected.items() if LAYERS.get(name) != layer}
    assert wrong == {}
    assert all(isinstance(layer, int) for layer in LAYERS.values())


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
    assert {"models", "face", "tiny"} <= imports_of(source)  # all three are imported inside methods


def test_no_module_is_over_400_lines_and_no_script_over_900():
    lines = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > (MAX_SCRIPT_LINES if name in SCRIPTS else MAX_LINES)}
    assert long == {}
    assert SCRIPTS <= lines.keys()  # a script that was renamed or removed is taken off the list


def test_the_library_never_imports_gradio():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in {"gradio", "spaces"} for n in names), path.name


def test_no_two_modules_share_a_file_name():
    """One name, one concept: a reader who sees `options` or `spec` in an import knows which file it is."""
    names = [p.stem for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    packages = [p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    repeated = sorted({n for n in names + packages if (names + packages).count(n) > 1})
    assert repeated == []


def test_nothing_is_imported_by_a_name_built_at_run_time():
    """Options are applied in plain sight, not looked up by string (no importlib)."""
    users = [p.name for p in PACKAGE.rglob("*.py") if "import_module" in p.read_text() or "__import__" in p.read_text()]
    assert users == []
