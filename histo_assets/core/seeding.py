"""Seeds derived from a master seed and names, so every random step is reproducible on its own.

Deriving a seed per item (class, image index, checkpoint step, ...) instead of
drawing from one shared stream keeps results identical however work is split
across processes, resumed or reordered.
"""

from __future__ import annotations

import hashlib


def derive_seed(master: int, *parts: object) -> int:
    """A 63-bit seed that depends only on the master seed and the given parts."""
    text = "|".join([str(int(master)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
