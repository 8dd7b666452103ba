"""The API reference renders, and every public name in it says what it is."""

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
