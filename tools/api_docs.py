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

# The public modules: the package (its __all__) and the modules users import by name.
PUBLIC_MODULES = (
    "tf_fusion", "tf_fusion.options", "tf_fusion.strategy", "tf_fusion.cross_device_ops",
    "tf_fusion.compression", "tf_fusion.cost_model", "tf_fusion.calibration",
    "tf_fusion.stats", "tf_fusion.plans", "tf_fusion.optimizers.lars",
    "tf_fusion.mixed_precision", "tf_fusion.callbacks", "tf_fusion.cluster",
    "tf_fusion.stall", "tf_fusion.preemption", "tf_fusion.launch",
)


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
