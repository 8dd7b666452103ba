"""The house's rules, checked from the code: small rooms, one-way imports, one seam.

- no module of tf_fusion, official_recipes or tools over 400 lines, no class over 250,
  no function over 60 (docstrings aside);
- no import circle among tf_fusion's modules (imports inside functions and under
  TYPE_CHECKING count);
- TensorFlow's and Keras's internals (`tensorflow.python`, `keras.src`, `__internal__`,
  a private attribute) only in tf_fusion/_internal/, and never in tools/ or the recipes;
  in tests/ only in the files named in TESTS_REACHING_INTERNALS, each with its reason.
"""

import ast
import pathlib
import re
import unittest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tf_fusion"
SEAM = PACKAGE / "_internal"
INTERNALS = re.compile(r"tensorflow\.python|keras\.src|__internal__|protected-access")
# The one list of tests that reach past the public API and the seam, and why. Every
# other test uses what users use (and tf_fusion._internal, the seam, for TF's types).
TESTS_REACHING_INTERNALS = {
    "tests/test_internal_seam.py": "the seam's contract: what it takes from TF and Keras",
    "tests/test_layout.py": "this rule's own pattern",
    "tests/harness/keras_retarget.py": "Keras's own optimizer tests, run on LARS",
    "tests/test_stall.py": "StallWatch's timer, which a raised fit must leave unarmed",
    "tests/test_planner.py": "an empty per-process cache of calibrated cost models",
    "tests/test_cross_device_ops.py": "the eager functions a copy must not share",
    "tests/test_keras_fit.py": "each replica's copy of a mirrored variable",
    "tests/test_lamb.py": "Keras's moving averages of the weights (use_ema)",
    "tests/test_mixed_precision.py": "the gradient accumulators under loss scaling",
}

# Tests mirror the library: tf_fusion/X.py is tested in tests/test_X.py, except the
# modules below, tested where what they serve is tested.
TESTED_ELSEWHERE = {
    "__init__": "test_api_docs.py (the public API, one list)",
    "algorithms": "test_cross_device_ops.py (ring, reduce_to_one against NumPy, bit for "
                  "bit) and test_multi_worker.py (hierarchical across workers)",
    "agreement": "test_multi_worker.py (workers that differ, on every worker)",
    "gradient_marker": "test_keras_paths.py and test_callbacks.py (only gradients ride "
                       "the 16-bit wire)",
    "stats": "test_sparse.py and test_cross_device_ops.py (the plan a reduction shows)",
    "shard_exchange": "test_sharded_update.py (one device's weights and state)",
    "shard_state": "test_sharded_update.py (the state read through the views, saved)",
    "shard_step": "test_sharded_update.py (every optimizer, 1 host and 2 workers)",
    "optimizers/layerwise": "test_lars.py and test_lamb.py (its two optimizers)",
    "_internal/keras": "test_internal_seam.py (the seam's contract)",
    "_internal/python": "test_internal_seam.py",
    "_internal/tf": "test_internal_seam.py",
}


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules):
  """The tf_fusion modules `path` imports (any depth: functions, TYPE_CHECKING)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for name in names:
      if name in modules:
        out.add(name)
        break
  return out


def find_cycle(graph):
  """One import circle of `graph` ({module: modules it imports}) as a list, or None."""
  state, stack = {}, []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in state:
        found = visit(v)
        if found:
          return found
    stack.pop()
    state[u] = 2
    return None

  for u in sorted(graph):
    if u not in state:
      found = visit(u)
      if found:
        return found
  return None


def oversized(path):
  """(what, lines, limit) for each definition of `path` over the house's limits."""
  src = path.read_text()
  out = []
  if len(src.splitlines()) > 400:
    out.append((str(path), len(src.splitlines()), 400))
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      limit = 250 if isinstance(node, ast.ClassDef) else 60
      first = node.body[0]
      doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
      size = node.end_lineno - (first.end_lineno if doc else node.lineno)
      if size > limit:
        out.append((f"{path}:{node.lineno} {node.name}", size, limit))
  return out


class LayoutTest(unittest.TestCase):

  def test_rooms_are_small(self):
    """The library, the recipes and the tools alike."""
    paths = [p for folder in (PACKAGE, ROOT / "official_recipes", ROOT / "tools")
             for p in sorted(folder.rglob("*.py"))]
    found = [o for p in paths for o in oversized(p)]
    self.assertEqual(found, [])

  def test_no_import_circle(self):
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {m: _imports(p, modules) - {m, "tf_fusion"} for m, p in paths.items()
             if m != "tf_fusion"}   # the package's __init__ only re-exports
    self.assertIsNone(find_cycle(graph))

  def test_find_cycle_finds_one(self):
    self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
    self.assertIsNone(find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}))

  def test_internals_only_behind_the_seam(self):
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if SEAM not in p.parents]
    outside += sorted((ROOT / "tools").rglob("*.py"))
    outside += sorted((ROOT / "official_recipes").rglob("*.py"))
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in outside for i, line in enumerate(p.read_text().splitlines(), 1)
             if INTERNALS.search(line)]
    self.assertEqual(found, [])
    self.assertTrue(any(INTERNALS.search(p.read_text()) for p in SEAM.glob("*.py")))

  def test_tests_reach_internals_only_where_named(self):
    reaching = {str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                if INTERNALS.search(p.read_text())}
    self.assertEqual(sorted(reaching), sorted(TESTS_REACHING_INTERNALS))

  def test_tests_mirror_the_library(self):
    """tests/test_X.py for tf_fusion/X.py (sub-packages: X's own name), or a named
    exception; and no exception for a module that has its own test file or is gone."""
    tests = {p.stem[len("test_"):] for p in (ROOT / "tests").glob("test_*.py")}
    modules = {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py")}
    modules -= {m for m in modules if m.endswith("__init__") and m != "__init__"}
    untested = sorted(m for m in modules
                      if m.split("/")[-1] not in tests and m not in TESTED_ELSEWHERE)
    self.assertEqual(untested, [])
    stale = sorted(m for m in TESTED_ELSEWHERE
                   if m not in modules or m.split("/")[-1] in tests)
    self.assertEqual(stale, [])


if __name__ == "__main__":
  unittest.main()
