"""CPython's introspection that tf_fusion relies on, behind one named function (the
seam's rule: underscore names are reached only here)."""

import sys


def thread_stack(thread_id: int):
  """The frames now running on thread `thread_id`, innermost first ([] if it ended)."""
  frame = sys._current_frames().get(thread_id)  # pylint: disable=protected-access
  stack = []
  while frame is not None:
    stack.append(frame)
    frame = frame.f_back
  return stack
