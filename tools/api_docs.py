"""The API reference of tf_fusion's public modules, generated from their docstrings.

  python -m tools.api_docs --out_dir out/api      # then open out/api/index.html

(`bash tools/dev.sh docs` runs it.) pdoc renders each public module with Google-style
docstrings; the pages are built from the code every time, so they cannot go stale, and
tests/test_api_docs.py renders them too and checks that every public name has a
docstring.
"""

import argparse
import importlib
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_fusion  # noqa: E402  (after the log level, which TensorFlow reads on import)

# The public modules: the package's one list of them.
PUBLIC_MODULES = tf_fusion.PUBLIC_MODULES


def undocumented(modules=PUBLIC_MODULES):
  """Public names of `modules` (pdoc's view: __all__ or no leading underscore) whose
  docstring is empty, as "module.name"; classes' own public methods included."""
  import pdoc.doc  # pylint: disable=g-import-not-at-top
  missing = []
  for name in modules:
    module = pdoc.doc.Module(importlib.import_module(name))
    for member in module.members.values():
      if member.is_inherited or member.name.startswith("_"):
        continue
      if isinstance(member, pdoc.doc.Variable):
        continue
      if not member.docstring.strip():
        missing.append(member.fullname)
      if isinstance(member, pdoc.doc.Class):
        for sub in member.own_members:
          if (isinstance(sub, pdoc.doc.Function) and not sub.name.startswith("_")
              and not sub.docstring.strip()):
            missing.append(sub.fullname)
  return missing


def render(out_dir, modules=PUBLIC_MODULES):
  """Writes the HTML pages of `modules` to `out_dir`; returns the paths written."""
  import pdoc  # pylint: disable=g-import-not-at-top
  pdoc.render.configure(docformat="google", show_source=True)
  out = pathlib.Path(out_dir)
  pdoc.pdoc(*modules, output_directory=out)
  return sorted(out.rglob("*.html"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out_dir", default="out/api")
  args = p.parse_args(argv)
  pages = render(args.out_dir)
  print(f"{len(pages)} pages in {args.out_dir}: open {args.out_dir}/index.html")
  missing = undocumented()
  if missing:
    print(f"no docstring: {', '.join(missing)}")


if __name__ == "__main__":
  main()
