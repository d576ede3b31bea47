"""Dependencies point one way: workflows <- data <- model, kernels <- runtime <- train (a
training run's machinery) <- the scripts (train.py, infer.py). A module imports only from its own
layer or the ones before it, and nothing in the library imports a script. agentc/util.py sits
under everything. Within a layer, no two modules import each other, however indirectly (a circle
hides behind a lazy import and breaks when someone moves it to the top of the file)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"util": 0, "workflows": 1, "data": 2, "model": 3, "kernels": 3, "runtime": 4, "train": 5}


def imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_library_imports_point_one_way():
    wrong = []
    for folder, _, files in os.walk(os.path.join(ROOT, "agentc")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, os.path.join(ROOT, "agentc"))
            part = rel.split(os.sep)[0].removesuffix(".py")
            if part == "__init__":
                continue
            for name in imports(path):
                top = name.split(".")[0]
                if top in ("train", "infer", "experiments", "tests"):
                    wrong.append(f"agentc/{rel} imports the script or folder {name}")
                elif top == "agentc" and name != "agentc":
                    target = name.split(".")[1]
                    if LAYER.get(target, 99) > LAYER[part]:
                        wrong.append(f"agentc/{rel} ({part}) imports {name} ({target})")
    assert not wrong, "\n".join(wrong)


def module_of(path: str) -> str:
    """agentc/runtime/episode.py -> agentc.runtime.episode; a package's __init__.py -> the package."""
    rel = os.path.relpath(path, ROOT).removesuffix(".py").split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def library_graph() -> dict[str, set[str]]:
    """agentc module -> the agentc modules it imports, at module or function level. `from
    agentc.runtime import agent` names the module agentc.runtime.agent; `from agentc.x.y import f`
    names agentc.x.y."""
    paths = [os.path.join(folder, f) for folder, _, files in os.walk(os.path.join(ROOT, "agentc"))
             for f in files if f.endswith(".py")]
    modules = {module_of(p) for p in paths}
    graph = {}
    for path in paths:
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                targets |= subs or {node.module}
        me = module_of(path)
        graph[me] = {t for t in targets if t in modules and t != me}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that reach each other (Tarjan's strongly connected
    components; a group of one is a circle only if the module imports itself), as a path
    [a, b, ..., a]."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # the shortest way back to the group's first module, within the group
        start = min(group)
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph.get(path[-1], ())) if w in group]
            if start in nxt:
                out.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(out)


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = library_graph()  # the graph is really built: a known edge of each kind is in it
    assert "agentc.runtime.agent" in graph["agentc.runtime.evaluate"]  # from agentc.runtime import agent
    assert "agentc.data.format" in graph["agentc.runtime.episode"]    # from agentc.data.format import ...


def test_no_import_cycles():
    found = cycles(library_graph())
    assert not found, "import cycles in agentc:\n" + "\n".join(" -> ".join(c) for c in found)
