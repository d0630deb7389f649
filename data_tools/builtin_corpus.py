"""Offline corpora that ship with every Python: the `.py` source files of the local standard library.

The quickstart needs some text without a download, and the standard library is always there.
Each file is one document. Two sizes:

    builtin:stdlib        about 4 MB of files, a fixed sample spread over the whole library; a
                          tokenizer and a preprocess run over it take seconds on one core
    builtin:stdlib-full   every file (about 12 MB on CPython 3.11)

The library's own test suites are left out of both: they are half its size, repetitive, and hold
files with deliberately broken encodings and syntax. Third-party packages under site-packages are
left out too, since they differ from machine to machine.
"""

import os
import sysconfig
import zlib

from data_tools import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("stdlib", "stdlib-full")
SAMPLE_BYTES = 4_000_000  # size of builtin:stdlib
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def builtin_files(spec: str) -> list[str]:
    """The files of builtin corpus `spec`, sorted by path so every run reads them in one order."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_NAMES:
        raise DataError(
            f"unknown builtin corpus {spec!r}; known: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        )
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_FOLDERS)
        files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise DataError(f"found no .py files under the standard library folder {root}")
    if name == "stdlib":
        files = _spread_sample(files, root, SAMPLE_BYTES)
    return sorted(files)


def _spread_sample(files: list[str], root: str, budget: int) -> list[str]:
    """Files in the order of a hash of their relative path until `budget` bytes are taken.

    Taking files in path order would fill the sample with the packages whose names come first
    (asyncio, concurrent, ...); a hash order is spread over the library and still the same on
    every machine with the same Python.
    """
    ordered = sorted(files, key=lambda path: zlib.crc32(os.path.relpath(path, root).encode()))
    chosen, taken = [], 0
    for path in ordered:
        if taken >= budget:
            break
        chosen.append(path)
        taken += os.path.getsize(path)
    return chosen
