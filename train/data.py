"""Training data: WebDataset shards → SDXL + CLIP batches, resumable per sample.

The training loop calls only `build_train_loader(cfg.data, ...)`; the loader is an infinite
iterator over batches with `state_dict()`/`load_state_dict()`. One sample travels top to bottom
through one module per stage, which `decode_sample` calls in order:

    read       data_tools.shards      tar stream → members → RawSample (train.data_stream picks which, in what order)
    decode     data_tools.decode      image header, caption, JSON metadata (BadSample: skipped and counted)
    transform  data_tools.transforms  bucket, resize, crop, flip, CLIP view (pixels decoded here, at reduced scale)
    augment    data_tools.augment     guidance drops, the reference view (instantstyle.augment's ops when on)
    collate    train.batch            one bucket's examples → a batch

`data=cached` swaps decode for `train.cached_data.decode_cached` (the cache format's checks) and collates
with `train.batch.collate_cached`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.augment import draw_drops, reference_augment, reference_view
from data_tools.buckets import parse_buckets
from data_tools.decode import BadSample, decode_caption, decode_meta, image_member, open_image, upright_size
from data_tools.shards import RawSample, expand_shards, shard_sample_counts
from data_tools.transforms import original_size, prepare_image, target_size
from train.batch import BatchQueues, collate, collate_cached
from train.config import ConfigError, DataConfig, section
from train.data_stream import StreamPlan

log = logging.getLogger(__name__)


def decode_sample(raw: RawSample, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Raw members → one training example, stage by stage; BadSample when it must be skipped."""
    if raw.error:
        raise BadSample(raw.error)
    # decode (the pixels themselves are decoded by prepare_image, at a reduced JPEG scale when it can)
    data, caption, meta = image_member(raw.members), decode_caption(raw.members), decode_meta(raw.members)
    image = open_image(data, cfg.max_image_pixels)
    # transform
    bucket = target_size(*upright_size(image), cfg.resolution, _bucket_list(cfg.buckets, cfg.resolution))
    prepared = prepare_image(image, bucket, cfg.clip_image_size, random_crop=cfg.random_crop,
                             random_flip=cfg.random_flip, rng=rng, keep_decoded=cfg.reference_crop is not None)
    source_size = original_size(meta, prepared.original_size)
    # augment
    drop_image, drop_text = draw_drops(rng, cfg)
    return {"key": raw.key, "caption": "" if drop_text else caption, "drop_image": drop_image,
            "pixels": prepared.pixels, "clip_pixels": reference_view(prepared, reference_augment(cfg), rng),
            "bucket": bucket, "original_size": source_size, "crop": prepared.crop_top_left}


def _bucket_list(spec: Any, resolution: int) -> tuple[tuple[int, int], ...] | None:
    key = spec if isinstance(spec, str) else tuple(tuple(b) for b in spec)
    return _parsed_buckets(key, resolution)


@functools.lru_cache(maxsize=8)
def _parsed_buckets(spec: Any, resolution: int) -> tuple[tuple[int, int], ...] | None:
    sizes = parse_buckets(spec, resolution)  # once per setting, not per sample
    return None if sizes is None else tuple(sizes)


@dataclass
class SkipLog:
    """Counts skipped samples by reason and logs them without flooding the log."""

    counts: Counter = field(default_factory=Counter)

    def add(self, error: BadSample, raw: RawSample) -> None:
        self.counts[error.reason] += 1
        n = self.counts[error.reason]
        if n <= 3 or (n & (n - 1)) == 0:  # first few, then at powers of two
            log.warning("skipping sample %s in %s (%s; %d so far for this reason)", raw.key, raw.shard, error, n)


class ShardStreamDataset(IterableDataset):
    """Yields collated batches from one stream per DataLoader worker, forever.

    A stream that decodes nothing in a whole epoch (all its shards bad, or no samples for it at all)
    yields a marker instead of a batch, so the DataLoader never waits on it for ever and the loader
    can tell a dead stream (the others go on) from dead data (every stream reports, and it fails).
    """

    def __init__(self, cfg: DataConfig, plan_args: dict, batch_size: int, seed: int, rank: int,
                 start: dict[int, dict], first_stream: int) -> None:
        self.cfg, self.plan_args, self.batch_size = cfg, plan_args, batch_size
        self.seed, self.rank, self.start, self.first_stream = seed, rank, start, first_stream

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(1, self.cfg.num_workers)
        # Rotate so the DataLoader's worker 0 serves the stream whose batch comes next after a resume.
        stream = ((info.id if info else 0) + self.first_stream) % workers
        if info is not None:
            torch.set_num_threads(1)  # workers run in parallel already; BLAS threads would oversubscribe
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, self.cfg.max_image_pixels)
        plan = StreamPlan(stream=self.rank * workers + stream, seed=self.seed, **self.plan_args)
        start = self.start.get(stream, {"epoch": 0, "offset": 0, "pending": []})
        skips, queues = SkipLog(), BatchQueues(self.batch_size)
        self._restore_pending(plan, start["pending"], queues)
        quiet = start["offset"] == 0  # resumed mid-epoch = it had emitted in this epoch
        for epoch, offset, raw in self._positions(plan, start["epoch"], start["offset"]):
            if raw is None:  # end of an epoch
                if quiet:
                    yield {"_stream": {"stream": stream, "epoch": epoch + 1, "offset": 0, "pending": queues.pending(),
                                       "skipped": dict(skips.counts), "empty_epoch": offset == 0}}
                quiet = True
                continue
            try:
                example = self._decode(plan, raw, epoch, offset)
            except BadSample as error:
                skips.add(error, raw)
                continue
            quiet = False
            batch = queues.add((epoch, offset), example)
            if batch is not None:
                out = _codec(self.cfg)[1](batch, self.cfg)
                out["_stream"] = {"stream": stream, "epoch": epoch, "offset": offset + 1,
                                  "pending": queues.pending(), "skipped": dict(skips.counts)}
                yield out

    def _decode(self, plan: StreamPlan, raw: RawSample, epoch: int, offset: int) -> dict:
        # Seeded by the position alone, so a resumed stream decodes a sample exactly as before.
        decode = _codec(self.cfg)[0]
        return decode(raw, self.cfg, np.random.default_rng([self.seed, epoch, plan.stream, offset]))

    def _restore_pending(self, plan: StreamPlan, pending: list, queues: BatchQueues) -> None:
        """Decode again the examples that were queued (not yet batched) at the checkpoint."""
        positions = [(int(e), int(o)) for e, o in pending]
        raws = plan.samples_at(positions)
        for epoch, offset in sorted(positions):
            queues.add((epoch, offset), self._decode(plan, raws[(epoch, offset)], epoch, offset))

    def _positions(self, plan: StreamPlan, epoch: int, offset: int) -> Iterator[tuple[int, int, RawSample | None]]:
        """(epoch, offset, raw sample) from a start position, across epochs, forever; (epoch, length, None) ends one."""
        while True:
            length = [0]
            for position, raw in plan.blocks(epoch, offset, length):
                yield epoch, position, raw
            yield epoch, length[0], None
            offset, epoch = max(0, offset - length[0]), epoch + 1


def _codec(cfg: DataConfig) -> tuple:
    """(decode, collate) for the shards' kind: images, or an embedding cache."""
    if cfg.cached:
        from train.cached_data import decode_cached

        return decode_cached, collate_cached
    return decode_sample, collate


def _identity(batch: dict) -> dict:
    return batch


class NoUsableData(ConfigError, RuntimeError):
    """No stream of this rank can produce a batch (all shards broken, a failing pipe: command, too few samples)."""


class TrainLoader:
    """Infinite, resumable iterator over batches for one rank."""

    def __init__(self, cfg: DataConfig, urls: list[str], counts: list[int | None], *, batch_size: int,
                 seed: int, rank: int, world_size: int) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size ≥ 1 and 0 ≤ rank < world_size (got {batch_size}, {rank}, {world_size})")
        self.cfg, self.batch_size, self.seed, self.rank, self.world_size = cfg, batch_size, seed, rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.plan_args = {"urls": tuple(urls), "counts": tuple(counts), "num_streams": world_size * self.workers,
                          "shuffle_buffer": cfg.shuffle_buffer}
        self.samples_seen, self.epoch, self.next_stream = 0, 0, 0
        self.streams: dict[int, dict] = {}
        self._skipped_base: Counter = Counter()
        self._skipped_live: dict[int, Counter] = {}

    def __iter__(self) -> Iterator[dict]:
        self._fold_skips()
        dataset = ShardStreamDataset(self.cfg, self.plan_args, self.batch_size, self.seed, self.rank,
                                     dict(self.streams), self.next_stream)
        workers = self.cfg.num_workers
        loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        markers: list[dict] = []  # end-of-epoch reports since the last batch
        for item in loader:
            info = item.pop("_stream")
            self._advance(info, len(item.get("keys", ())))
            if "keys" in item:
                markers = []
                yield item
                continue
            markers.append(info)
            if len(markers) >= 2 * self.workers:  # every stream of this rank: two epochs without a sample
                raise NoUsableData(self._no_data_message(markers))

    def _no_data_message(self, markers: list[dict]) -> str:
        if all(m["empty_epoch"] for m in markers):
            return (f"rank {self.rank} got no samples: use more shards/samples than ranks × data.num_workers "
                    f"({self.world_size} × {self.workers})")
        return (f"no decodable sample in 2 epochs of any of rank {self.rank}'s {self.workers} streams "
                f"({self.skipped()}): check the shards with python -m data_tools.check_shards")

    def _advance(self, info: dict, size: int) -> None:
        self.streams[info["stream"]] = {k: info[k] for k in ("epoch", "offset", "pending")}
        self._skipped_live[info["stream"]] = Counter(info["skipped"])
        self.samples_seen += size
        self.epoch = info["epoch"] if size else self.epoch
        self.next_stream = (info["stream"] + 1) % self.workers  # the DataLoader serves workers round-robin

    def _fold_skips(self) -> None:
        for counts in self._skipped_live.values():
            self._skipped_base.update(counts)
        self._skipped_live = {}

    def skipped(self) -> dict[str, int]:
        """Skipped-sample counts by reason on this rank, over the whole run."""
        total = Counter(self._skipped_base)
        for counts in self._skipped_live.values():
            total.update(counts)
        return dict(sorted(total.items()))

    def stats(self) -> dict[str, float]:
        """Flat numbers for the logger: samples seen, epoch, skipped counts by reason."""
        out: dict[str, float] = {"data/samples_seen": self.samples_seen, "data/epoch": self.epoch}
        out.update({f"data/skipped/{reason.replace(' ', '_')}": n for reason, n in self.skipped().items()})
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable resume state for this rank."""
        return {"samples_seen": self.samples_seen, "epoch": self.epoch,
                "batch_size": self.batch_size, "num_workers": self.workers, "world_size": self.world_size,
                "seed": self.seed, "skipped": self.skipped(), "next_stream": self.next_stream,
                "streams": {str(k): v for k, v in sorted(self.streams.items())}}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue after the samples in `state`; exact per-stream positions when the layout matches."""
        same = all(state.get(k) == v for k, v in (("batch_size", self.batch_size), ("num_workers", self.workers),
                                                   ("world_size", self.world_size), ("seed", self.seed)))
        self._skipped_base, self._skipped_live = Counter(state["skipped"]), {}
        self.epoch = int(state["epoch"])
        if same:
            self.samples_seen = int(state["samples_seen"])
            self.streams = {int(k): _stream_state(v) for k, v in state["streams"].items()}
            self.next_stream = int(state["next_stream"])
        else:
            log.warning("data layout changed since the checkpoint; resuming from its sample count instead")
            self.skip_samples(int(state["samples_seen"]))

    def skip_samples(self, samples_seen: int) -> None:
        """Resume from a bare count: each worker stream skips the batches it had produced."""
        batches = samples_seen // self.batch_size
        if samples_seen % self.batch_size:
            log.warning("samples_seen=%d is not a multiple of batch_size=%d; resuming at %d",
                        samples_seen, self.batch_size, batches * self.batch_size)
        self.samples_seen = batches * self.batch_size
        # Batch b came from stream b % workers; a stream's offset may run past epoch 0 (carried over).
        self.streams = {w: {"epoch": 0, "offset": ((batches - w + self.workers - 1) // self.workers) * self.batch_size,
                            "pending": []} for w in range(self.workers) if batches > w}
        self.next_stream = batches % self.workers


def _stream_state(value: Mapping) -> dict:
    """A stream's saved position: {epoch, offset, pending}."""
    return {"epoch": int(value["epoch"]), "offset": int(value["offset"]),
            "pending": [[int(e), int(o)] for e, o in value["pending"]]}


def build_train_loader(data_cfg: Any, *, batch_size: int, seed: int, rank: int, world_size: int,
                       samples_seen: int = 0, urls: list[str] | None = None) -> TrainLoader:
    """Build this rank's infinite batch iterator; `samples_seen` resumes after that many of its samples.

    `urls` is the already expanded shard list when the caller has it (training checks it once).
    """
    cfg = section(data_cfg, "data", DataConfig)
    urls = urls if urls is not None else expand_shards(cfg.shards)
    counts = shard_sample_counts(urls)
    streams = world_size * max(1, cfg.num_workers)
    if any(c is None for c in counts):
        # Without counts the epoch cannot be cut into equal ranges: the old per-shard split.
        unknown = sum(c is None for c in counts)
        log.warning("%d of %d shard%s no sample counts (no manifest.json beside them): streams split by %s; "
                    "write one for an even split: python -m data_tools.make_manifest DIR",
                    unknown, len(urls), " has" if len(urls) == 1 else "s have",
                    "shard" if len(urls) >= streams else "sample, every stream reading every shard")
    loader = TrainLoader(cfg, urls, counts, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if samples_seen:
        loader.skip_samples(samples_seen)
    return loader
