"""The package's modules import one another without circles: every import statement, late
(function-level) ones included, is an edge of the graph checked here."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in (ROOT / "mm_jax").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def imported(name: str, path: pathlib.Path, known) -> set[str]:
  """The package's modules that `name` imports anywhere in its code, late imports included.

  `from package import module` depends on the module alone: the package's __init__ runs first
  either way, and a module importing its own parent package is no circle.
  """
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  deps = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      deps.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
      deps.update(submodules or [base])
  return {d for d in deps if d in known and d != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every cycle's members (the strongly connected components with more than one module)."""
  order, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    order[v] = low[v] = len(order)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in order:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], order[w])
    if low[v] == order[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in order:
      visit(v)
  return found


def test_cycle_finder_finds_a_hand_made_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
  known = modules()
  graph = {name: imported(name, path, known) for name, path in known.items()}
  assert "mm_jax.run" in graph["mm_jax.train"]  # the parser sees imports at all
  assert cycles(graph) == []
