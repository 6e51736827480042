"""Randomness derived from (seed, purpose, ids...), never from process state.

A client's shuffling in round r depends only on (seed, client id, r), so results
do not change with the number of actors, the order tasks run in, or a resume.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _entropy(seed: int, purpose: str, keys: tuple[int, ...]) -> list[int]:
    # crc32 is stable across processes and Python versions, unlike hash(). The key
    # count goes in too: SeedSequence pads with zeros, so (k,) and (k, 0) would collide.
    return [int(seed), zlib.crc32(purpose.encode()), len(keys), *(int(k) for k in keys)]


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A NumPy generator for one purpose, e.g. ``rng(seed, "sample", round)``."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, purpose, keys)))


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer seed for libraries that take one (torch)."""
    state = np.random.SeedSequence(_entropy(seed, purpose, keys)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A torch CPU generator seeded with :func:`derive_seed` ``(seed, purpose, *keys)``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, purpose, *keys))
    return gen
