"""The path-kernel engine (docs/engine.md). Importing it registers the built-in layer rules."""

from . import attention_rules as _attention_rules  # noqa: F401 - registers MultiheadAttention
from . import conv_rules as _conv_rules  # noqa: F401 - registers Conv2d and GroupNorm
