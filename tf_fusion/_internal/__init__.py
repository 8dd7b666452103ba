"""The one seam between tf_fusion and TensorFlow's and Keras's private internals.

Everything tf_fusion needs that TensorFlow or Keras do not export (`tensorflow.python`
modules, `keras.src`, attributes with a leading underscore, hooks that subclasses
override) is reached through the named functions and classes of `tf` and `keras` here,
and nowhere else (`python` holds the one CPython introspection call, for StallWatch). A
TensorFlow or Keras upgrade that moves one of them fails in tests/test_internal_seam.py
under that function's name, not somewhere deep in a step.

Both modules check the installed version on import and warn once for a version this
project has not been tested with (see TESTED_TENSORFLOW / TESTED_KERAS).
"""
