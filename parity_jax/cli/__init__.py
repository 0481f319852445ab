"""The command-line tools: thin absl programs over the library (flags in, one call, printed result, exit code).

Each module is one tool, installed as the console script ``parity-<tool>``
(``pyproject.toml`` ``[project.scripts]``) and runnable from the repository
root as ``python -m tools.<tool>``. :mod:`.app` holds what they share.
"""
