"""The one-way house: imports run down the layers, and no module imports itself back.

The layers, bottom to top, as folders of the repository and the names they install as (this
table is the only place it is written in code; the README's layout section says the same):

    conf/      distill.conf       Hydra YAML
    common/    distill.common     errors, files, run log, typed config, the command line
    students/  distill.students   the Qwen3 family: sizes, building, tokenizer, chat, decoding
    teachers/  distill.teachers   teacher backends, the teacher-output cache      } siblings: neither
    eval/      distill.eval       the eval harness and its tasks                  } imports the other
    distill/   distill            the roof: entry point, stages, losses, training

A module may import its own layer and the layers below it. Every import counts, also one inside
a function: an import placed in a function to dodge a loop is still a loop.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"conf": "distill.conf", "common": "distill.common", "students": "distill.students",
           "teachers": "distill.teachers", "eval": "distill.eval", "distill": "distill"}
RANK = {"distill.conf": 0, "distill.common": 1, "distill.students": 2, "distill.teachers": 3, "distill.eval": 3,
        "distill": 4}


def modules() -> dict[str, Path]:
    """{module name as installed: file} for every module of the project's packages."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "lm_eval_tasks" in parts:
                continue  # loaded by lm-eval from its folder, not imported as a package module
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in RANK else "distill"


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in it); `from pkg import sub` counts
    as an import of the submodule."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in known else node.module)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that go up a layer or sideways between sibling layers."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer(a) != layer(b) and RANK[layer(b)] >= RANK[layer(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_layering_table_covers_every_folder_of_code():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(FOLDERS), f"a package folder is not in the layering table: {packages ^ set(FOLDERS)}"
    assert len(modules()) > 50


def test_no_import_goes_up_a_layer_or_sideways():
    assert upward_imports(import_graph()) == []


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_loop():
    """The two checks fail on the shapes they are for (a lower layer importing the roof, and a
    loop through an import inside a function)."""
    graph = {"distill.students.build": {"distill.students.tokenizer"},
             "distill.students.tokenizer": {"distill.students.build"},
             "distill.teachers.cache": {"distill.data"}, "distill.data": set(),
             "distill.eval.run": {"distill.teachers.cache"}}
    assert upward_imports(graph) == [("distill.eval.run", "distill.teachers.cache"),
                                     ("distill.teachers.cache", "distill.data")]
    assert cycles(graph) == [["distill.students.build", "distill.students.tokenizer"]]
    source = "def f():\n    from distill.pipeline import run\n"
    tree_imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert tree_imports and tree_imports[0].module == "distill.pipeline"  # found inside a function too
