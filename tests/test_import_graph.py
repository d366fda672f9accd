"""The packages are layered: the import graph of lcp/, pipeline/ and cli.py has no cycle.

Every import statement counts, also those inside functions (a cycle hidden by a function-level
import is still a cycle); `from pkg import name` is an edge to `pkg.name` when that is a module,
else to `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lcp", "pipeline")


def _modules() -> dict[str, Path]:
    out = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import lcp.native.x` -> the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "pipeline.scheduling.scheduler" in graph["pipeline.runs.table_run"]  # imports are seen
    assert "pipeline.tracking.store" in graph["pipeline.worker"]  # function-level ones too


def test_no_import_cycle_among_lcp_pipeline_and_cli():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lcp_never_imports_the_pipeline_or_its_tools():
    graph = import_graph()
    for name, path in _modules().items():
        if not name.startswith("lcp"):
            continue
        assert not any(t.startswith("pipeline") or t == "cli" for t in graph[name]), name
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import)
                                  else [ast.alias(node.module or "")])}
        assert not imported & {"mlflow", "optuna", "click"}, name


def private_uses() -> list[str]:
    """Where a module of lcp/, pipeline/, cli.py or benchmarks/ reaches another's private names:
    a `from project.module import _name`, or `x._name` on anything but `self`/`cls` (an object
    of another class, a module alias) — except attributes of the standard library's and other
    packages' modules, which are not ours to tidy (e.g. `os._exit`). The tests are left out:
    they reach private seams on purpose (a stubbed download, a forced compiler, a solver's
    check interval)."""
    external = {"os", "sys", "torch", "np", "numpy", "signal", "ctypes", "importlib"}
    found = []
    benchmarks = {f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    for name, path in {**_modules(), **benchmarks}.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    *PACKAGES, "cli"):
                found += [f"{name}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__")):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if isinstance(root, ast.Name) and root.id in external:
                    continue
                found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    assert private_uses() == [], "\n".join(private_uses())


def long_signatures(sources: dict[str, str], limit: int = 8) -> list[str]:
    """The functions in `sources` (name → code) with more than `limit` parameters (positional
    and keyword-only, not self/cls, *args or **kwargs): a long list wants a small options
    object instead. Click commands are exempt: their parameters are their options."""
    found = []
    for name, code in sources.items():
        for node in ast.walk(ast.parse(code, name)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or any(
                    "click." in ast.unparse(d) for d in node.decorator_list):
                continue
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)
                     if a.arg not in ("self", "cls")]
            if len(names) > limit:
                found.append(f"{name}:{node.lineno} {node.name}: {len(names)} parameters")
    return found


def test_no_pipeline_function_takes_more_than_eight_parameters():
    planted = {"m.py": "def ok(self, a, b, c, d, e, f, g, h, *args, **kw): pass\n"
                       "def long(a, b, c, d, /, e, f, g, *, h, i): pass\n"
                       "@click.command()\ndef cmd(a, b, c, d, e, f, g, h, i): pass\n"}
    assert long_signatures(planted) == ["m.py:2 long: 9 parameters"]
    pipeline = {str(p.relative_to(ROOT)): p.read_text()
                for p in sorted((ROOT / "pipeline").rglob("*.py"))}
    found = long_signatures(pipeline)
    assert found == [], "\n".join(found)


def longest_chain(graph: dict[str, set[str]], top: tuple[str, ...] = ("cli", "pipeline")
                  ) -> list[str]:
    """The longest import chain that starts at a module of `top` and goes through them, down to
    the first module outside them it reaches (the library, lcp/, counts as one step)."""
    memo: dict[str, list[str]] = {}

    def down(node: str) -> list[str]:
        if node not in memo:
            best = [node]
            if node.startswith(top):
                for nxt in graph[node]:
                    chain = [node] + down(nxt)
                    best = chain if len(chain) > len(best) else best
            memo[node] = best
        return memo[node]

    return max((down(n) for n in graph if n.startswith(top)), key=len)


def test_the_pipeline_is_layered_and_its_longest_import_chain_is_short():
    graph = import_graph()
    # a shared name lives in the lowest module that needs it, so these edges are not needed
    for source, target in [("pipeline.reporting.report", "pipeline.runs.table_run"),
                           ("pipeline.runs.table_run", "pipeline.worker"),
                           ("pipeline.worker", "pipeline.tuning.tune"),
                           ("pipeline.tracking.store", "pipeline.runs.ownership"),
                           ("pipeline.tuning.optuna_study", "pipeline.runs.ownership")]:
        assert target not in graph[source], f"{source} imports {target}"
    assert longest_chain({"a": {"b"}, "b": {"c", "x"}, "c": set(), "x": {"y"}, "y": set()},
                         top=("a", "b", "c")) in (["a", "b", "x"], ["a", "b", "c"])
    chain = longest_chain(graph)
    assert len(chain) <= 7, " -> ".join(chain)


# The pipeline's layers, top to bottom (README, "Reading the pipeline"): a module imports only
# modules of its own layer or below.
LAYERS = [
    ["cli", "pipeline.commands"],
    ["pipeline.runs.table", "pipeline.tuning.tune", "pipeline.reporting.report",
     "pipeline.runs.budget", "pipeline.tracking.ui"],
    ["pipeline.runs.table_run", "pipeline.scheduling.scheduler", "pipeline.scheduling.executors",
     "pipeline.runs.ownership", "pipeline.worker", "pipeline.tuning.trial"],
    ["pipeline.manifest.selection", "pipeline.tuning.optuna_study", "pipeline.reporting.health",
     "pipeline.reporting.plots"],
    ["pipeline.manifest.manifest", "pipeline.manifest.schema", "pipeline.tracking.store",
     "pipeline.runs.rundir", "pipeline.tracking.run_status", "pipeline.scheduling.openmp"],
]

# The pipeline's folders (pipeline/__init__.py), top to bottom: one concern each, and a folder's
# modules import only modules of its own folder or of the folders below it. commands and worker
# are the two modules at the top: the commands, and the process of one run or trial.
FOLDERS = ["pipeline.commands", "pipeline.worker", "pipeline.tuning", "pipeline.reporting",
           "pipeline.runs", "pipeline.manifest", "pipeline.tracking", "pipeline.scheduling"]


def test_every_pipeline_module_imports_only_its_layer_or_below():
    graph = import_graph()
    files = _modules()
    layer = {module: i for i, modules in enumerate(LAYERS) for module in modules}
    listed = {m for m in graph if (m.startswith("pipeline.") and not _is_package(m, files))
              or m == "cli"}
    assert listed == set(layer), f"not in LAYERS: {sorted(listed - set(layer))}"
    upward = [f"{m} -> {t}" for m in layer for t in graph[m] if t in layer and layer[t] < layer[m]]
    assert not upward, upward


def folder_of(module: str) -> str:
    """`pipeline.runs.table` -> `pipeline.runs`; a module at the top is its own folder."""
    return ".".join(module.split(".")[:2])


def test_every_pipeline_folder_imports_only_itself_or_the_folders_below():
    graph = import_graph()
    modules = _modules()
    packages = {m for m in graph if m.startswith("pipeline") and _is_package(m, modules)}
    assert packages == {"pipeline", *FOLDERS[2:]}, sorted(packages)
    # an __init__ imports nothing: importing a module loads only what it needs (cli.py imports
    # pipeline.scheduling.openmp before torch is imported)
    assert not any(graph[p] for p in packages), {p: graph[p] for p in packages if graph[p]}
    everything = {folder_of(m) for m in graph if m.startswith("pipeline.")}
    assert everything == set(FOLDERS), sorted(everything ^ set(FOLDERS))
    rank = {folder: i for i, folder in enumerate(FOLDERS)}
    upward = sorted({f"{m} -> {t}" for m in graph if m.startswith("pipeline.")
                     for t in graph[m] if t.startswith("pipeline.")
                     and rank[folder_of(t)] < rank[folder_of(m)]})
    assert not upward, upward


def terminal_status_writers(sources: dict[str, str]) -> list[str]:
    """Where code in `sources` (name → code) ends an MLflow run itself: a call of
    `set_terminated` (MLflow's, or the Tracker's that wraps it) or a `set_status`/`create_run`
    given a terminal status."""
    found = []
    for name, code in sources.items():
        for node in ast.walk(ast.parse(code, name)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            values = [*node.args, *(k.value for k in node.keywords)]
            terminal = any(isinstance(v, ast.Constant) and v.value in ("FINISHED", "FAILED",
                                                                       "KILLED") for v in values)
            if node.func.attr == "set_terminated" or (
                    node.func.attr in ("set_status", "create_run", "update_run") and terminal):
                found.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_one_module_writes_a_runs_terminal_status():
    planted = {"m.py": 'tracker.set_terminated(r, "FAILED")\ntracker.set_status(r, "KILLED")\n'
                       'tracker.set_status(r, "RUNNING")\nexecutor.terminate(handle)\n'}
    assert terminal_status_writers(planted) == ["m.py:1 tracker.set_terminated",
                                                "m.py:2 tracker.set_status"]
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in
               [ROOT / "cli.py", *sorted((ROOT / "pipeline").rglob("*.py")),
                *sorted((ROOT / "benchmarks").glob("*.py"))]}
    # pipeline.tracking.run_status ends runs; pipeline.tracking.store holds the MLflow call it makes
    allowed = {"pipeline/tracking/run_status.py", "pipeline/tracking/store.py"}
    found = [w for w in terminal_status_writers(sources) if w.split(":")[0] not in allowed]
    assert found == [], "\n".join(found)
    # ... and the Tracker's one wrapper of it is the only call there
    in_tracking = terminal_status_writers({"t": (ROOT / "pipeline/tracking/store.py").read_text()})
    assert [w.split(" ")[1] for w in in_tracking] == ["self.client.set_terminated"], in_tracking
