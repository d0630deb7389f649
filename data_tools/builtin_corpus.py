"""Offline corpora that ship with every Python: `builtin:stdlib` is the standard library's source.

The quickstart needs some text without a download; the ~20 MB of `.py` files of the local standard
library are always there. Each file is one document.
"""

import os
import sysconfig

from data_tools import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("stdlib",)


def builtin_files(spec: str) -> list[str]:
    """The files of builtin corpus `spec` ("builtin:stdlib"), sorted so every run sees one order."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name != "stdlib":
        raise DataError(
            f"unknown builtin corpus {spec!r}; known: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        )
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Installed third-party packages live under the stdlib folder in many installs; they are
        # not the standard library and differ from machine to machine.
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise DataError(f"found no .py files under the standard library folder {root}")
    return sorted(files)
