"""Bounded per-replica LRU cache of inversions.

Slider UIs send the same photo again for every strength they show; the encoder is the most
expensive stage after synthesis, so the W+ code of each face is kept, keyed by the SHA-256
of the uploaded bytes and the face's box. Only latents are kept, never pixels, and only in
memory (face photos are personal data).

The gateway runs on one asyncio loop and the cache is touched only from it, so no lock.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Hashable

import numpy as np


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InversionCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.capacity == 0:
            return
        # a read-only copy: callers edit latents, and an edit must never reach the cache
        frozen = np.array(value, dtype=np.float32)
        frozen.setflags(write=False)
        self._entries[key] = frozen
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
