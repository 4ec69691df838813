"""lmforge: build a language model end to end.

Run `lmforge --help` for the stages; `lmforge run` runs the demo recipe.
"""

__version__ = "0.1.0"
