"""Even split of an epoch over rank×worker streams: each sample once, each shard read by few streams."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

import train.data_stream as data_stream
from data_tools.shards import Sample, tar_bytes
from tests.test_data_loader import data_cfg, good_sample, keys_of, make_dataset, take
from train.data import build_train_loader
from data_tools.shards import expand_shards, shard_sample_counts
from train.data_stream import StreamPlan


def epoch_draws(root, num_streams: int, epoch: int = 0, shuffle_buffer: int = 4, monkeypatch=None):
    """Keys each stream draws in one epoch, and which streams open which shard."""
    urls = expand_shards(str(root / "*.tar"))
    counts = shard_sample_counts(urls)
    opened: Counter = Counter()
    draws = {}
    real = data_stream.open_shard
    for stream in range(num_streams):
        plan = StreamPlan(tuple(urls), tuple(counts), seed=5, stream=stream, num_streams=num_streams,
                          shuffle_buffer=shuffle_buffer)
        if monkeypatch is not None:
            def spy(url, _stream=stream, _real=real):
                opened[(url, _stream)] += 1
                return _real(url)
            monkeypatch.setattr(data_stream, "open_shard", spy)
        draws[stream] = [raw.key for _, raw in plan.blocks(epoch, 0, [0])]
    return draws, opened


@pytest.mark.parametrize("num_shards,per_shard,num_streams", [(2, 9, 4), (5, 8, 4), (3, 7, 8)])
def test_every_sample_is_drawn_exactly_once_per_epoch(tmp_path, monkeypatch, num_shards, per_shard, num_streams):
    all_keys = make_dataset(tmp_path, num_shards, per_shard)
    for epoch in (0, 1):
        draws, opened = epoch_draws(tmp_path, num_streams, epoch, monkeypatch=monkeypatch)
        drawn = Counter(k for keys in draws.values() for k in keys)
        assert drawn == Counter(all_keys)  # exactly once each, so every shard gives exactly per_shard
        per_shard_draws = Counter(int(k) // per_shard for k in drawn.elements())
        assert per_shard_draws == Counter({s: per_shard for s in range(num_shards)})
        lengths = [len(keys) for keys in draws.values()]
        assert max(lengths) - min(lengths) <= 1  # equal epoch lengths (±1)
        # Contiguous ranges of the concatenated shards: each boundary between two streams' ranges
        # costs at most one extra opening of a shard (today: every stream opens every shard).
        assert sum(opened.values()) <= num_shards + num_streams - 1
        assert all(n == 1 for n in opened.values())  # each stream opens a shard once per epoch


def test_without_manifest_counts_the_old_split_is_used_and_logged(tmp_path, caplog):
    all_keys = make_dataset(tmp_path, 2, 6)
    (tmp_path / "manifest.json").unlink()
    urls = expand_shards(str(tmp_path / "*.tar"))
    draws = Counter()
    for stream in range(3):
        plan = StreamPlan(tuple(urls), (None, None), seed=5, stream=stream, num_streams=3, shuffle_buffer=4)
        draws.update(raw.key for _, raw in plan.blocks(0, 0, [0]))
    assert draws == Counter(all_keys)
    with caplog.at_level("WARNING"):
        build_train_loader(data_cfg(tmp_path, num_workers=3), batch_size=1, seed=0, rank=0, world_size=1)
    assert "sample counts" in caplog.text


def test_uneven_streams_resume_exactly(tmp_path):
    make_dataset(tmp_path, 5, 7)  # 35 samples over 2 ranks × 2 workers: ranges of 8 and 9
    cfg = data_cfg(tmp_path, num_workers=2, random_crop=True)
    build = lambda: build_train_loader(cfg, batch_size=3, seed=1, rank=1, world_size=2)  # noqa: E731
    full = take(build(), 16)
    head = build()
    take(head, 7)
    resumed = build()
    resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
    assert keys_of(take(resumed, 9)) == keys_of(full[7:])


def test_a_stream_with_only_bad_shards_does_not_stop_the_others(tmp_path):
    # Two shards, one per stream; with seed 0 stream 1 gets shard 1 in epochs 0-4, and it is all bad.
    # That stream reports empty epochs and goes on, so the run keeps training on stream 0's data.
    make_dataset(tmp_path, 2, 4)
    (tmp_path / "00001.tar").write_bytes(tar_bytes([Sample(f"bad{i}", {"txt": b"no image"}) for i in range(4)]))
    cfg = data_cfg(tmp_path, num_workers=2)
    build = lambda: build_train_loader(cfg, batch_size=2, seed=0, rank=0, world_size=1)  # noqa: E731
    loader = build()
    keys = keys_of(take(loader, 6))  # stream 0's epochs 0-2
    assert Counter(keys) == Counter({f"{i:06d}": 3 for i in range(4)})
    assert loader.skipped()["missing image"] >= 8
    head = build()
    take(head, 3)
    resumed = build()
    resumed.load_state_dict(json.loads(json.dumps(head.state_dict())))
    assert keys_of(take(resumed, 3)) == keys[6:]


def test_all_bad_data_with_several_streams_still_fails_clearly(tmp_path):
    bad = [Sample(f"bad{i}", {"txt": b"no image"}) for i in range(4)]
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(tar_bytes(bad))
    with pytest.raises(RuntimeError, match="no decodable sample"):
        take(build_train_loader(data_cfg(tmp_path, num_workers=2), batch_size=1, seed=0, rank=0, world_size=1), 1)
