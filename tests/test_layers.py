"""Layers that only point down: read from the source with ``ast`` (nothing imported), every engine module imports
only its own layer or lower ones, and never the front ends; the figures load neither torch nor a decoder."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = ("ui", "storage", "cli")

# Records and schemas < the model and its per-step maths < code the decoders share < decoders < entry points.
# A module belongs to the layer of the longest name below that is it or a package holding it; an unlisted module
# is an entry point.
LAYERS = (
    ("engine.events", "engine.files", "engine.params", "engine.trace", "engine.recorder", "engine.limits",
     "engine.event_arrays", "engine.shared_params", "engine.constraints", "engine.ngram", "engine.hot_start"),
    ("engine.models", "engine.attention", "engine.ffn", "engine.processing"),
    ("engine.context", "engine.decoding", "engine.speculative", "engine.diffusion", "engine.kv_compress",
     "engine.prompt_spans", "engine.adadec_threshold"),
    ("engine.decoders",),
    ("engine", "engine.run", "engine.explore", "engine.reprocess"),
)
# Offline training, data generation and evaluation: an entry point like the others (it may import any engine
# module), beside the decoding path, which imports none of it.
OFFLINE = "engine.offline"
# Imports under TYPE_CHECKING count too (a type names its layer); these are the only upward ones: the limits
# name the request they check in annotations, while their run guard sits below the models that call it.
ANNOTATIONS_ONLY = {("engine.limits", "engine.decoders.base"), ("engine.limits", "engine.run")}
DECODER_FAMILIES = ("engine.decoders.token", "engine.decoders.speculative", "engine.decoders.diffusion")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ENGINE = {module_name(path): path for path in sorted((ROOT / "engine").rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """Every module a source file imports: at the top, lazily in a function, or for annotations only."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        for alias in node.names:  # ``from engine.decoders import token`` imports a module, not a name
            submodule = f"{node.module}.{alias.name}"
            self.found.add(submodule if submodule in ENGINE else node.module)


def imports_of(path: Path) -> set[str]:
    visitor = _Imports()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
    return visitor.found


def layer_of(module: str) -> int:
    owners = [(len(name), index) for index, names in enumerate(LAYERS) for name in names
              if module == name or module.startswith(name + ".")]
    return max(owners)[1] if owners else len(LAYERS) - 1


def test_engine_never_imports_a_front_end():
    wrong = {module: sorted(i for i in imports_of(path) if i.split(".")[0] in FRONT_ENDS)
             for module, path in ENGINE.items()}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_engine_modules_import_only_their_layer_or_lower_ones():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
        for module, path in ENGINE.items()
        for imported in sorted(imports_of(path))
        if imported.split(".")[0] == "engine" and layer_of(imported) > layer_of(module)
        and (module, imported) not in ANNOTATIONS_ONLY
    ]
    assert upward == []


def is_offline(module: str) -> bool:
    return module == OFFLINE or module.startswith(OFFLINE + ".")


def test_the_decoding_path_never_imports_the_offline_package():
    reaching = {module: sorted(i for i in imports_of(path) if is_offline(i))
                for module, path in ENGINE.items() if not is_offline(module)}
    assert {module: found for module, found in reaching.items() if found} == {}


def test_no_decoder_imports_another_decoder_module():
    decoders = [module for module in ENGINE if module.startswith(tuple(f"{family}." for family in DECODER_FAMILIES))]
    assert len(decoders) > 30  # the families' modules were found
    borrowed = {module: sorted(i for i in imports_of(ENGINE[module]) if i.startswith(DECODER_FAMILIES))
                for module in decoders}
    assert {module: found for module, found in borrowed.items() if found} == {}


def test_the_layer_walk_sees_upward_imports():
    assert layer_of("engine.decoders.token.greedy") > layer_of("engine.decoding") > layer_of("engine.models.handle")
    assert layer_of("engine.models.handle") > layer_of("engine.events") and layer_of("engine.run") == len(LAYERS) - 1
    assert "engine.context" in imports_of(ENGINE["engine.decoding"])
    assert "engine.decoders.token" in imports_of(ENGINE["engine.decoders"])
    assert "engine.run" in imports_of(ENGINE["engine.limits"])  # under TYPE_CHECKING
    assert "engine.offline.waitline_data" in imports_of(ENGINE["engine.offline.train_dllm"])


def test_importing_the_figures_loads_neither_torch_nor_a_decoder():
    code = ("import json, sys, ui.figures; "
            "print(json.dumps(['torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('engine.decoders'))]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == [False, []]
