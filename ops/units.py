"""Units people read."""

from __future__ import annotations


def human_size(size: float) -> str:
    """Bytes in the unit that fits (decimal, as disks and `df -H` count): 512 B, 48.2 kB,
    2.0 MB, 1.07 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            break
        size /= 1000
    if unit == "B":
        return f"{int(size)} B"
    return f"{size:.2f} {unit}" if size < 10 else f"{size:.1f} {unit}"
