"""The package's shape holds: docs/architecture.md's layers (a module imports only from its own
layer or below), no import circle, no module over 600 lines. Imports are read from the source,
at module level and inside functions alike."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"splitmatch": ROOT / "platform" / "splitmatch", "splitmatch.dashboards": ROOT / "dashboards"}
MAX_LINES = 600

# docs/architecture.md's table, bottom up. An entry names a module or a package (all of it,
# unless a longer entry names one of its modules); "splitmatch" is the package's own __init__.
LAYERS = {
    "basics": ["splitmatch", "errors", "files", "progress", "network", "examples", "package_copy", "splits",
               "stats", "selection", "config"],
    "storage": ["storage"],
    "maths": ["pseudo", "matcher", "criterion", "targets", "evaluation", "model", "visualize", "averaging"],
    "data": ["data"],
    "frozen CLIP": ["clip", "pseudo.kernel", "toyclip"],
    "caches": ["pseudo.cache", "pseudo.training_candidates"],
    "engine": ["engine", "calibration", "checkpoints", "checkpoint_evaluation"],
    "MLflow records": ["tracking"],
    "Ray": ["cluster", "failures", "rendezvous", "pseudo.pipeline", "progress_relay", "train_loop",
            "train", "tune", "search_progress", "predict"],
    "MLflow models and pages": ["pyfunc", "publish", "dashboards"],
    "commands": ["cli", "demo", "ablation", "class_report", "diagnose", "jobs", "bench"],
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts[:-1 if parts[-1] == "__init__" else None]))] = path
    return found


def layer_of(module: str) -> int:
    name = module.removeprefix("splitmatch").removeprefix(".") or "splitmatch"
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS.values())
               for entry in entries
               if name == entry or (entry != "splitmatch" and name.startswith(entry + "."))]
    assert matches, f"{module} is in no layer of docs/architecture.md"
    return max(matches)[1]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            names |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                      for alias in node.names}
    resolved = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.add(name)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_every_import_points_down_the_layer_table():
    upward = [f"{module} ({list(LAYERS)[layer_of(module)]}) imports {other} "
              f"({list(LAYERS)[layer_of(other)]})"
              for module, others in graph().items() for other in sorted(others)
              if layer_of(other) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges, state, circles = graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(edges[module]):
            if state.get(other) == "open":
                circles.append(" -> ".join([*path[path.index(other):], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_no_module_over_600_lines():
    long = {module: n for module, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
