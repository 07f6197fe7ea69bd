"""Deterministic sample order: shard shuffle, rank/worker split, block shuffle, cheap resume.

Every (rank, worker) stream is a pure function of (seed, epoch, stream id):
1. shards are permuted with an RNG seeded by (seed, epoch);
2. with at least as many shards as streams, stream g takes shards[g::S];
   otherwise every stream reads every shard and keeps samples i ≡ g (mod S);
3. samples are shuffled in consecutive blocks of `shuffle_buffer`, each block
   with an RNG seeded by (seed, epoch, g, block).
A position is (epoch, offset) in that order, counting raw samples (bad ones
too), so resuming skips straight to a block without decoding anything and
skips whole shards using the manifest's counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from data_tools.shards import RawSample, TruncatedTar, iter_samples, open_shard


@dataclass(frozen=True)
class StreamPlan:
    """The sample order of one (rank, worker) stream."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]
    seed: int
    stream: int
    num_streams: int
    shuffle_buffer: int

    def epoch_shards(self, epoch: int) -> tuple[list[int], int, int]:
        """Shard indices read this epoch, and (modulus, residue) selecting this stream's samples."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls)).tolist()
        if len(self.urls) >= self.num_streams:
            return order[self.stream::self.num_streams], 1, 0
        return order, self.num_streams, self.stream

    def raw_samples(self, epoch: int, skip: int, length: list[int]) -> Iterator[RawSample]:
        """Raw samples of this stream in shard order from local index `skip`; sets length[0] at the end."""
        shards, mod, res = self.epoch_shards(epoch)
        base = 0  # index of the shard's first sample in this epoch's concatenation
        for index in shards:
            count = self.counts[index]
            if count is not None and _local_count(base + count, mod, res) <= skip:
                base += count  # whole shard already consumed: do not even open it
                continue
            base = yield from self._shard_samples(index, base, mod, res, skip)
        length[0] = _local_count(base, mod, res)

    def _shard_samples(self, index: int, base: int, mod: int, res: int, skip: int):
        url, count = self.urls[index], self.counts[index]

        def keep(i: int) -> bool:
            g = base + i
            return g % mod == res and (g - res) // mod >= skip

        progress, error = [0], None
        try:
            with open_shard(url) as stream:
                yield from iter_samples(stream, url, keep=keep, progress=progress)
        except TruncatedTar:
            error = "truncated tar"
        except OSError:
            error = "unreadable shard"
        read = progress[0]
        # Pad a short shard to its manifest count so every run numbers samples alike.
        missing = (count - read) if count is not None else (1 if error else 0)
        for i in range(read, read + max(missing, 0)):
            if keep(i):
                yield RawSample(f"{os.path.basename(url)}#{i}", url, error=error or "truncated tar")
        return base + read + max(missing, 0)

    def blocks(self, epoch: int, skip: int, length: list[int]) -> Iterator[tuple[int, RawSample]]:
        """(offset, sample) in block-shuffled order from offset `skip`; sets length[0] at the end."""
        size = max(1, self.shuffle_buffer)
        block = skip // size
        raw = self.raw_samples(epoch, block * size, length)
        while True:
            items = [sample for _, sample in zip(range(size), raw)]
            if not items:
                return
            order = np.random.default_rng([self.seed, epoch, self.stream, block]).permutation(len(items))
            for j, i in enumerate(order.tolist()):
                if block * size + j >= skip:
                    yield block * size + j, items[i]
            block += 1


def _local_count(total: int, mod: int, res: int) -> int:
    """How many of the indices 0..total-1 are ≡ res (mod mod)."""
    return max(0, (total - res + mod - 1) // mod)
