"""The recipes' flags in named groups, and the --helpshort that lists them so.

absl's --helpshort lists the flags defined in the main module, and the recipes define
theirs in shared_flags.py and recipe_flags.py: it would list none. Every flag of a
recipe is defined inside `group(name, fv)`, with the same group names in the same order
in both recipes (the same concept in the same place), and `--helpshort` (or --help)
prints them group by group. --helpfull stays absl's: every flag, by module.
"""

import contextlib
import sys
import textwrap

from absl import app
from absl import flags

# The order --helpshort prints them in.
GROUPS = ("model", "data", "schedule", "optimizer", "precision", "communication",
          "distribution", "output")

_MEMBERS = {}   # id(FlagValues) -> {group: [flag names, in definition order]}


@contextlib.contextmanager
def group(name, fv):
  """Flags defined into `fv` inside this block belong to group `name`."""
  if name not in GROUPS:
    raise ValueError(f"unknown flag group {name!r}; groups: {', '.join(GROUPS)}.")
  before = set(fv)
  yield
  members = _MEMBERS.setdefault(id(fv), {}).setdefault(name, [])
  members.extend(n for n in fv if n not in before and fv[n].name == n
                 and n not in members)


def groups_of(fv):
  """{group: [flag names]} of `fv`, in GROUPS order, empty groups left out."""
  members = _MEMBERS.get(id(fv), {})
  return {g: list(members[g]) for g in GROUPS if members.get(g)}


def grouped_help(fv):
  """The text --helpshort prints: each group's flags, with help and default."""
  lines = []
  for name, members in groups_of(fv).items():
    lines.append(f"\n{name}:")
    for flag_name in members:
      flag = fv[flag_name]
      text = f"--{flag_name}: {flag.help}"
      if flag.default is not None:
        text += f" (default: {flag.default_as_str})"
      lines.extend(textwrap.wrap(text, width=88, initial_indent="  ",
                                 subsequent_indent="    ", break_on_hyphens=False))
  return "\n".join(lines)


class _GroupedHelpFlag(flags.BooleanFlag):
  """--helpshort (and --help): the main module's docstring, then grouped_help."""

  def __init__(self, name, short_name=None):
    super().__init__(name, False, "show this help: the recipe's flags by group",
                     short_name=short_name, allow_hide_cpp=True)

  def parse(self, argument):
    if self._parse(argument):
      print(sys.modules["__main__"].__doc__ or "")
      print("flags:" + grouped_help(flags.FLAGS))
      print("\nTry --helpfull to get a list of all flags, by module.")
      sys.exit(1)   # as absl's own help flags


def install_help():
  """Replaces absl's --help/--helpshort (main module only) with the grouped list."""
  app.define_help_flags()
  for name in ("help", "?", "helpshort"):
    delattr(flags.FLAGS, name)
  flags.DEFINE_flag(_GroupedHelpFlag("help", short_name="?"))
  flags.DEFINE_flag(_GroupedHelpFlag("helpshort"))
