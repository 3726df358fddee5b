"""The package's shape: imports run one way, from the command lines down to the data, and modules stay small.

Layers, lowest first (a module may import only from lower layers, or from its
own sub-package without a cycle):

    files, lock, progress      helpers every layer may use
    data                       layouts, splits, image ops, the tf.data pipeline
    models                     networks, never their weights
    weights                    checkpoints loaded into built models
    config                     the run settings' table
    evaluation                 scores, figures, Grad-CAM, the report
    serving                    folding, SavedModel, TFLite
    training                   phases, optimizer, callbacks, devices, the loop
    runs                       finished run folders: evaluate, ensemble, compare, predict, submit
    command lines              `python -m tfdogs.<verb>`: thin, and never importing one another
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tfdogs"
LAYERS = (("tfdogs", "tfdogs.files", "tfdogs.lock", "tfdogs.progress"), ("tfdogs.data",), ("tfdogs.models",), ("tfdogs.weights",),
          ("tfdogs.config",), ("tfdogs.evaluation",), ("tfdogs.serving",), ("tfdogs.training",), ("tfdogs.runs",))
MAX_LINES = 400


def module_names():
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


MODULES = module_names()


def layer_of(module):
    """The layer index of a module; command-line modules (and the benchmark) sit above all layers."""
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or (prefix != "tfdogs" and module.startswith(prefix + ".")) for prefix in prefixes):
            return index
    return len(LAYERS)


def imports_of(module):
    """The tfdogs modules `module` imports anywhere in its file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tfdogs"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfdogs"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_import_names_a_module_of_the_package():
    unknown = {f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
               if target not in MODULES}
    assert not unknown


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {layer_of(module)}) -> {target} (layer {layer_of(target)})"
              for module, targets in GRAPH.items() for target in targets if layer_of(target) > layer_of(module)]
    assert not upward


def test_command_lines_do_not_import_one_another():
    def command(module):  # tfdogs.bench.steps belongs to the command tfdogs.bench
        return ".".join(module.split(".")[:2])

    top = len(LAYERS)
    crossing = [f"{module} -> {target}" for module, targets in GRAPH.items() if layer_of(module) == top
                for target in targets if layer_of(target) == top and command(target) != command(module)]
    assert not crossing


def test_there_is_no_import_cycle():
    visiting, done, cycles = [], set(), []

    def visit(module):
        if module in visiting:
            cycles.append(" -> ".join(visiting[visiting.index(module):] + [module]))
            return
        if module in done:
            return
        visiting.append(module)
        for target in sorted(GRAPH.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles


def test_model_code_never_imports_weight_code():
    assert not [f"{module} -> {target}" for module, targets in GRAPH.items() if module.startswith("tfdogs.models")
                for target in targets if target.startswith("tfdogs.weights")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by job"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above would fail on the faults they look for (models -> weights -> models, training -> runs)."""
    assert "tfdogs.models" in GRAPH["tfdogs.weights.load"]
    assert layer_of("tfdogs.runs.folder") > layer_of("tfdogs.training.loop") > layer_of("tfdogs.data.pipeline")
    assert layer_of("tfdogs.train") == len(LAYERS)
