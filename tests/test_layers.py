"""Dependencies point one way: workflows <- data <- model, kernels <- runtime <- the scripts
(train.py, infer.py). A module imports only from its own layer or the ones before it, and nothing
in the library imports a script. agentc/util.py sits under everything."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"util": 0, "workflows": 1, "data": 2, "model": 3, "kernels": 3, "runtime": 4}


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
