"""Deterministic sample order: shard shuffle, even rank/worker split, block shuffle, cheap resume.

Every (rank, worker) stream is a pure function of (seed, epoch, stream id):
1. shards are permuted with an RNG seeded by (seed, epoch), and their samples concatenated;
2. with every shard's sample count known (the manifest), stream g of S takes the contiguous
   range [g·N/S, (g+1)·N/S) of that concatenation: each sample is drawn exactly once per epoch,
   epoch lengths differ by at most one, and a shard is opened only by the streams whose range
   touches it (N/S samples from one shard at a time, not one sample in S from every shard);
   without counts, the old split: shards[g::S] when there are at least S shards, else every
   stream reads every shard and keeps the samples i ≡ g (mod S);
3. samples are shuffled in consecutive blocks of `shuffle_buffer`, each block
   with an RNG seeded by (seed, epoch, g, block).
A position is (epoch, offset) in that order, counting raw samples (bad ones
too), so resuming skips straight to a block without decoding anything and
skips whole shards using the manifest's counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from data_tools.shards import RawSample, TruncatedTar, iter_samples, open_shard


@dataclass(frozen=True)
class Selection:
    """The indices start, start+step, … (below stop, when known) of an epoch's concatenated shards."""

    start: int
    step: int
    stop: int | None

    def local(self, index: int) -> int | None:
        """This stream's position of concatenated sample `index`, or None when it is not selected."""
        if index < self.start or (index - self.start) % self.step or (self.stop is not None and index >= self.stop):
            return None
        return (index - self.start) // self.step

    def count_below(self, total: int) -> int:
        """How many selected indices are < total."""
        end = total if self.stop is None else min(total, self.stop)
        return max(0, (end - self.start + self.step - 1) // self.step)


class _RangeDone(Exception):
    """This stream's range ends inside the open shard: stop reading it (raised so pipes are killed, not drained)."""


@dataclass(frozen=True)
class StreamPlan:
    """The sample order of one (rank, worker) stream."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]
    seed: int
    stream: int
    num_streams: int
    shuffle_buffer: int

    @property
    def even(self) -> bool:
        """True when every count is known, so streams get equal contiguous ranges."""
        return all(c is not None for c in self.counts)

    def epoch_shards(self, epoch: int) -> tuple[list[int], Selection]:
        """Shard indices this stream may read this epoch, in order, and which of their samples it takes."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls)).tolist()
        g, s = self.stream, self.num_streams
        if self.even:
            total = sum(self.counts)
            return order, Selection(g * total // s, 1, (g + 1) * total // s)
        if len(self.urls) >= s:
            return order[g::s], Selection(0, 1, None)
        return order, Selection(g, s, None)

    def raw_samples(self, epoch: int, skip: int, length: list[int]) -> Iterator[RawSample]:
        """Raw samples of this stream in shard order from local index `skip`; sets length[0] at the end."""
        shards, selection = self.epoch_shards(epoch)
        base = 0  # index of the shard's first sample in this epoch's concatenation
        for index in shards:
            count = self.counts[index]
            if selection.stop is not None and base >= selection.stop:
                break  # past this stream's range: the later shards belong to other streams
            if count is not None and selection.count_below(base + count) <= skip:
                base += count  # whole shard before the range, or already consumed: do not even open it
                continue
            base = yield from self._shard_samples(index, base, selection, skip)
        length[0] = selection.count_below(base)

    def _shard_samples(self, index: int, base: int, selection: Selection, skip: int):
        url, count = self.urls[index], self.counts[index]

        def keep(i: int) -> bool:
            if count is not None and i >= count:
                return False  # more samples than the manifest says: they would belong to the next shard's index
            local = selection.local(base + i)
            return local is not None and local >= skip

        progress, error = [0], None
        try:
            with open_shard(url) as stream:
                for raw in iter_samples(stream, url, keep=keep, progress=progress):
                    yield raw
                    if selection.stop is not None and base + progress[0] >= selection.stop:
                        raise _RangeDone
        except _RangeDone:
            return base + count  # only in the even split, where every count is known
        except TruncatedTar as broken:
            error = broken.reason  # truncated, not a tar at all, or its pipe: command failed
        except OSError:
            error = "unreadable shard"
        read = progress[0]
        # Pad a short shard to its manifest count so every run numbers samples alike.
        missing = (count - read) if count is not None else (1 if error else 0)
        for i in range(read, read + max(missing, 0)):
            if keep(i):
                yield RawSample(f"{os.path.basename(url)}#{i}", url, error=error or "truncated tar")
        return base + (count if count is not None else read + max(missing, 0))

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

    def samples_at(self, positions: Iterable[tuple[int, int]]) -> dict[tuple[int, int], RawSample]:
        """The raw samples at these (epoch, offset) positions, reading each shuffle block once."""
        size, found = max(1, self.shuffle_buffer), {}
        wanted = sorted(set(positions))
        for epoch, block in sorted({(e, o // size) for e, o in wanted}):
            in_block = {o for e, o in wanted if e == epoch and o // size == block}
            for offset, raw in self.blocks(epoch, min(in_block), [0]):
                if offset // size != block:
                    break
                if offset in in_block:
                    found[(epoch, offset)] = raw
        return found
