"""The architecture stays visible: no import cycles among our modules, and the layers point one
way (the DEEPEN math needs nothing else of ours; the engine knows nothing of ranks)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_imports() -> dict[str, set[str]]:
    """Every module of runtime/ and launcher/ -> the modules of ours it imports (anywhere in it)."""
    paths = {}
    for top in ("runtime", "launcher"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            paths[name] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found |= {c for c in candidates if c in paths and c != name and not name.startswith(c + ".")}
        graph[name] = found
    return graph


def test_no_import_cycles():
    graph = module_imports()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    graph = module_imports()
    for name, imports in graph.items():
        if name.startswith("runtime.deepen"):
            assert all(i.startswith("runtime.deepen") for i in imports), (name, imports)
        if name.startswith("runtime.engine"):
            assert not any(i.startswith(("runtime.distributed", "runtime.evaluation", "runtime.bench",
                                         "runtime.jobs")) for i in imports), (name, imports)
        if name.startswith("runtime"):
            assert not any(i.startswith("launcher") for i in imports), (name, imports)
