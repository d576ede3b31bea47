"""The install: none of our import names is one that a distribution in our dependency tree
installs, so nothing of ours can shadow a dependency (our old top-level `kernels/` hid the PyPI
package `kernels`, which transformers >= 5.25 imports) or be shadowed by one.

Our import names are what a script at the repository root can import because the root is on
sys.path: the package `agentc`, the scripts `train` and `infer`, and the folders `tests` and
`experiments` (tests import `tests.fake_workflow` and `experiments.trace_report` by name)."""
import importlib.metadata as md
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_NAMES = {"agentc", "train", "infer", "tests", "experiments"}


def requirement_names(path: str) -> list[str]:
    names = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.match(r"[A-Za-z0-9._-]+", line).group(0))
    return names


def dependency_tree() -> set[str]:
    """Normalised names of every installed distribution that requirements.txt pulls in, directly or
    not (extras and environment markers that do not apply are skipped, as pip does)."""
    def norm(n):
        return re.sub(r"[-_.]+", "-", n).lower()
    seen, todo = set(), [norm(n) for n in requirement_names(os.path.join(ROOT, "requirements.txt"))]
    from packaging.requirements import Requirement
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed installs no names either
        seen.add(name)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def test_the_repository_holds_only_our_names():
    """Every importable thing at the root (a module, a package, a folder of modules) is one of
    OUR_NAMES, so the check below covers all of them."""
    found = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            found.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith(".") and any(
                f.endswith(".py") and f != "conftest.py" for f in os.listdir(path)):
            found.add(entry)
    assert found <= OUR_NAMES, f"new importable names at the root: {sorted(found - OUR_NAMES)}"


def test_no_dependency_installs_one_of_our_names():
    tree = dependency_tree()
    assert {"torch", "transformers", "numpy"} <= tree  # the walk found the tree
    clashes = {name: dists for name, dists in md.packages_distributions().items()
               if name in OUR_NAMES and {re.sub(r"[-_.]+", "-", d).lower() for d in dists} & tree}
    assert not clashes, f"a dependency installs one of our import names: {clashes}"


@pytest.mark.slow  # a process importing transformers; the two checks above are the default run's
def test_transformers_hub_kernels_and_our_kernels_in_one_process():
    """What `python train.py` does: the root is first on sys.path, transformers imports the PyPI
    package `kernels`, and ours load too."""
    pytest.importorskip("transformers")
    code = ("import importlib.util, transformers.integrations.hub_kernels, agentc.kernels.flash_attention, "
            "agentc.kernels.masked_ce; from agentc.model import checkpoint\n"
            "if importlib.util.find_spec('kernels'):\n"
            "    import kernels; assert not kernels.__file__.startswith(%r), kernels.__file__\n"
            "print('ok')" % os.path.join(ROOT, "kernels", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
