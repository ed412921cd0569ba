"""Files that must come through a hostile case unchanged, compared byte for byte.

Pure filesystem: the unit tests use it as well as the integration tests.
"""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Everything under ``root``: mode and content (or link target), to compare byte for byte."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        if path.is_symlink():
            found[str(path)] = (info.st_mode, os.readlink(path))
        elif path.is_dir():
            found[str(path)] = (info.st_mode, b"")
        else:
            found[str(path)] = (info.st_mode, path.read_bytes())
    return found
