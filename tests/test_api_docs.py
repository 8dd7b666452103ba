"""The API reference renders, and every public name in it says what it is."""

import pathlib
import re
import sys

import tensorflow as tf

import tf_fusion
from tools import api_docs


class ApiDocsTest(tf.test.TestCase):

  def test_every_public_name_has_a_docstring(self):
    self.assertEqual(api_docs.undocumented(), [])

  def test_undocumented_finds_a_missing_docstring(self):
    folder = self.create_tempdir()
    folder.create_file("undocumented_example.py", (
        '"""A module."""\n\n'
        "def bare():\n  return 1\n\n"
        "def _private():\n  return 2\n\n"
        'class Documented:\n  """A class."""\n\n'
        "  def method(self):\n    return 3\n"))
    sys.path.insert(0, folder.full_path)
    try:
      self.assertEqual(api_docs.undocumented(("undocumented_example",)),
                       ["undocumented_example.bare", "undocumented_example.Documented.method"])
    finally:
      sys.path.remove(folder.full_path)

  def test_pages_name_every_public_name(self):
    pages = api_docs.render(self.create_tempdir().full_path)
    text = {p.name: p.read_text() for p in pages}
    self.assertIn("tf_fusion.html", text)
    for name in tf_fusion.__all__:
      if not name.startswith("__"):
        self.assertIn(name, text["tf_fusion.html"], name)
    self.assertIn('id="FusedAllReduce"', text["cross_device_ops.html"])


class PublicApiTest(tf.test.TestCase):
  """The recipes are the first users: they reach tf_fusion only through its public list
  (tools/, whose benchmarks time the library's parts, are exempt by design)."""

  def test_the_recipes_use_only_the_public_modules(self):
    root = pathlib.Path(__file__).resolve().parents[1] / "official_recipes"
    used = set()
    for path in root.rglob("*.py"):
      text = path.read_text()
      used |= {f"tf_fusion.{m}" for m in re.findall(r"from tf_fusion import (\w+)", text)}
      used |= set(re.findall(r"from (tf_fusion[\w.]*) import", text))
      for dotted in re.findall(r"\btf_fusion((?:\.[a-z_]+)+)", text):
        parts = dotted.strip(".").split(".")
        module = next((".".join(["tf_fusion", *parts[:k]]) for k in range(len(parts), 0, -1)
                       if ".".join(["tf_fusion", *parts[:k]]) in tf_fusion.PUBLIC_MODULES),
                      None)
        if module is None and parts[0] not in tf_fusion.__all__:
          used.add(f"tf_fusion.{parts[0]}")
    self.assertEqual(sorted(m for m in used if m not in tf_fusion.PUBLIC_MODULES
                            and m.split(".", 1)[-1] not in tf_fusion.__all__), [])
    for name in tf_fusion.PUBLIC_MODULES:
      __import__(name)


if __name__ == "__main__":
  tf.test.main()
