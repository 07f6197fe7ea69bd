"""Training loader: rank/worker split, determinism, exact resume, bad samples, no unpickling."""

from __future__ import annotations

import io
import itertools
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.shards import Manifest, Sample, ShardRecord, shard_name, tar_bytes, write_manifest, write_shard
from instantstyle.encode import clip_input, vae_input
from train.config import CLIP_MEAN, CLIP_STD, DataConfig, section
from train.data import build_train_loader, decode_sample
from data_tools.shards import expand_shards
from train.data_stream import StreamPlan



def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small random PNG (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def good_sample(index: int) -> Sample:
    key = f"{index:06d}"
    return Sample(key, {"png": png_bytes(index), "txt": f"caption {index}".encode(),
                        "json": json.dumps({"key": key}).encode()})


def make_dataset(root: Path, num_shards: int, per_shard: int) -> list[str]:
    """Shards of good samples plus a manifest; returns every key."""
    manifest, keys = Manifest(complete=True), []
    for shard in range(num_shards):
        samples = [good_sample(shard * per_shard + i) for i in range(per_shard)]
        nbytes = write_shard(root / shard_name(shard), samples)
        manifest.shards.append(ShardRecord(shard_name(shard), per_shard, nbytes))
        keys += [s.key for s in samples]
    write_manifest(root, manifest)
    return keys


def data_cfg(root: Path, **overrides) -> dict:
    cfg = {"shards": str(root / "*.tar"), "resolution": 32, "clip_image_size": 16, "num_workers": 0,
           "shuffle_buffer": 4, "drop_image_prob": 0.2, "drop_text_prob": 0.2, "drop_both_prob": 0.1}
    return {**cfg, **overrides}


def take(loader, batches: int) -> list[dict]:
    return list(itertools.islice(iter(loader), batches))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("num_shards,per_shard,batch", [(8, 5, 2), (2, 10, 1)])
def test_ranks_and_workers_see_disjoint_complete_epoch(tmp_path, num_shards, per_shard, batch):
    # (8, 5): whole shards per stream; (2, 10): fewer shards than streams, split by sample.
    all_keys = make_dataset(tmp_path, num_shards, per_shard)
    per_rank = len(all_keys) // 2 // batch
    seen = [keys_of(take(build_train_loader(data_cfg(tmp_path, num_workers=2), batch_size=batch, seed=3,
                                            rank=rank, world_size=2), per_rank)) for rank in (0, 1)]
    assert len(set(seen[0])) == len(seen[0]) == len(all_keys) // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(all_keys)


def test_same_seed_same_order_and_seed_matters(tmp_path):
    all_keys = make_dataset(tmp_path, 4, 6)
    runs = [take(build_train_loader(data_cfg(tmp_path), batch_size=3, seed=s, rank=0, world_size=1), 10)
            for s in (7, 7, 8)]
    assert keys_of(runs[0]) == keys_of(runs[1])
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(runs[0], runs[1]))
    assert [a["captions"] for a in runs[0]] == [b["captions"] for b in runs[1]]
    assert keys_of(runs[0]) != keys_of(runs[2])
    # The epoch boundary is crossed at 24 samples and the next epoch is reshuffled.
    keys = keys_of(runs[0])
    assert sorted(keys[:24]) == all_keys and keys[24:30] != keys[:6]


@pytest.mark.parametrize("via", ["state_dict", "samples_seen"])
def test_resume_continues_exactly(tmp_path, via):
    make_dataset(tmp_path, 5, 7)
    cfg = data_cfg(tmp_path, num_workers=2, random_crop=True, random_flip=True)
    build = lambda **kw: build_train_loader(cfg, batch_size=3, seed=1, rank=0, world_size=1, **kw)  # noqa: E731
    full = take(build(), 30)  # 90 samples: more than two epochs of 35
    first = build()
    head = take(first, 11)
    assert keys_of(head) == keys_of(full[:11])
    if via == "state_dict":
        resumed = build()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    else:
        resumed = build(samples_seen=first.state_dict()["samples_seen"])
    tail = take(resumed, 19)
    assert keys_of(tail) == keys_of(full[11:])
    for a, b in zip(tail, full[11:]):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["drop_image"], b["drop_image"])
        assert torch.equal(a["crop_coords_top_left"], b["crop_coords_top_left"]) and a["captions"] == b["captions"]
    assert resumed.state_dict()["samples_seen"] == 90


def test_resume_skips_consumed_shards_without_opening_them(tmp_path):
    make_dataset(tmp_path, 4, 5)
    cfg = data_cfg(tmp_path, shuffle_buffer=5)
    full = keys_of(take(build_train_loader(cfg, batch_size=5, seed=0, rank=0, world_size=1), 4))
    consumed_shards = {int(k) // 5 for k in full[:5]}
    assert len(consumed_shards) == 1  # one block = one shard here
    (tmp_path / shard_name(consumed_shards.pop())).write_bytes(b"")  # the consumed shard is now unreadable
    resumed = build_train_loader(cfg, batch_size=5, seed=0, rank=0, world_size=1, samples_seen=5)
    assert keys_of(take(resumed, 3)) == full[5:]
    assert resumed.skipped() == {}  # never opened, so never found broken


def _bad_dataset(root: Path) -> tuple[set[str], Counter]:
    """One shard mixing good and bad samples, one truncated shard; returns good keys and expected reasons."""
    big = png_bytes(99, (64, 64))
    samples = [good_sample(i) for i in range(4)] + [
        Sample("trunc_img", {"png": png_bytes(5)[:60], "txt": b"cut"}),
        Sample("zero_img", {"png": b"", "txt": b"zero"}),
        Sample("no_caption", {"png": png_bytes(6)}),
        Sample("bad_json", {"png": png_bytes(7), "txt": b"x", "json": b"{not json"}),
        Sample("too_big", {"png": big, "txt": b"big"}),
        Sample("no_image", {"txt": b"only text"}),
    ]
    (root / "00000.tar").write_bytes(tar_bytes(samples))
    cut = tar_bytes([good_sample(10), good_sample(11), good_sample(12)])
    (root / "00001.tar").write_bytes(cut[: len(cut) // 2])
    good = {f"{i:06d}" for i in range(4)} | {"000010"}
    reasons = Counter({"truncated image": 1, "zero-byte image": 1, "missing caption": 1, "bad json": 1,
                       "image over pixel limit": 1, "missing image": 1, "truncated tar": 1})
    return good, reasons


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path):
    good, reasons = _bad_dataset(tmp_path)
    cfg = section(data_cfg(tmp_path, max_image_pixels=48 * 48), "data", DataConfig)
    plan = StreamPlan(tuple(expand_shards(cfg.shards)), (None, None), seed=0, stream=0, num_streams=1,
                      shuffle_buffer=4)
    seen, counted = set(), Counter()
    for offset, raw in plan.blocks(0, 0, [0]):
        try:
            seen.add(decode_sample(raw, cfg, np.random.default_rng(offset))["key"])
        except Exception as error:  # noqa: BLE001 — asserting the exact type below
            assert type(error).__name__ == "BadSample", error
            counted[error.reason] += 1
    assert seen == good and counted == reasons


def test_loader_survives_bad_samples_and_reports_them(tmp_path):
    good, reasons = _bad_dataset(tmp_path)
    loader = build_train_loader(data_cfg(tmp_path, max_image_pixels=48 * 48), batch_size=1, seed=0,
                                rank=0, world_size=1)
    keys = keys_of(take(loader, 3 * len(good)))  # three epochs
    assert set(keys) == good and Counter(keys) == Counter({k: 3 for k in good})
    skipped = loader.skipped()
    assert set(skipped) == set(reasons) and all(2 * reasons[r] <= n <= 3 * reasons[r] for r, n in skipped.items())
    assert loader.stats()["data/skipped/truncated_tar"] == skipped["truncated tar"]
    assert loader.load_state_dict(loader.state_dict()) is None and loader.skipped() == skipped


class WritesFileWhenUnpickled:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def test_pickle_members_are_never_unpickled(tmp_path):
    probe = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(WritesFileWhenUnpickled(probe)))
    assert probe.exists()  # the payload is live: unpickling it would write the file
    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(WritesFileWhenUnpickled(target))
    shard = tmp_path / "shards"
    shard.mkdir()
    samples = [Sample(f"{i:03d}", {**good_sample(i).members, "pyd": payload, "pickle": payload, "pth": payload})
               for i in range(4)]
    (shard / "00000.tar").write_bytes(tar_bytes(samples))
    loader = build_train_loader(data_cfg(shard, num_workers=1), batch_size=2, seed=0, rank=0, world_size=1)
    batches = take(loader, 4)
    assert sorted(keys_of(batches)[:4]) == ["000", "001", "002", "003"]
    assert not target.exists() and set(batches[0]) == {
        "pixel_values", "clip_pixel_values", "captions", "drop_image", "original_size",
        "crop_coords_top_left", "target_size", "keys"}


def test_batch_format_values(tmp_path):
    make_dataset(tmp_path, 1, 4)
    cfg = data_cfg(tmp_path, drop_image_prob=0.0, drop_text_prob=0.0, drop_both_prob=0.0, shuffle_buffer=0)
    batch = take(build_train_loader(cfg, batch_size=4, seed=0, rank=0, world_size=1), 1)[0]
    assert batch["pixel_values"].dtype == batch["clip_pixel_values"].dtype == torch.uint8
    # What the task encodes: the same normalisation DiffusionTask.encode applies on the device.
    batch = {**batch, "pixel_values": vae_input(batch["pixel_values"]),
             "clip_pixel_values": clip_input(batch["clip_pixel_values"], CLIP_MEAN, CLIP_STD)}
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["clip_pixel_values"].shape == (4, 3, 16, 16)
    assert batch["original_size"].tolist() == [[32, 40]] * 4  # (height, width) of the 40×32 PNGs
    assert batch["crop_coords_top_left"].tolist() == [[0, 4]] * 4  # resized to 40×32, centred
    assert batch["target_size"].tolist() == [[32, 32]] * 4 and batch["target_size"].dtype == torch.long
    assert batch["captions"] == [f"caption {int(k)}" for k in batch["keys"]] and not batch["drop_image"].any()
    image = Image.open(io.BytesIO(png_bytes(int(batch["keys"][0])))).convert("RGB")
    crop = image.crop((4, 0, 36, 32))
    expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(batch["pixel_values"][0], expected, atol=1e-6)
    clip = torch.from_numpy(np.array(crop.resize((16, 16), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    clip = (clip - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(batch["clip_pixel_values"][0], clip, atol=1e-5)


@pytest.mark.parametrize("probs,want_image,want_text", [((1, 0, 0), True, False), ((0, 1, 0), False, True),
                                                        ((0, 0, 1), True, True)])
def test_guidance_drops_follow_probabilities(tmp_path, probs, want_image, want_text):
    make_dataset(tmp_path, 1, 4)
    cfg = data_cfg(tmp_path, drop_image_prob=probs[0], drop_text_prob=probs[1], drop_both_prob=probs[2])
    batch = take(build_train_loader(cfg, batch_size=4, seed=0, rank=0, world_size=1), 1)[0]
    assert batch["drop_image"].tolist() == [want_image] * 4
    assert all((c == "") == want_text for c in batch["captions"])


def test_drop_rates_are_close_to_configured(tmp_path):
    make_dataset(tmp_path, 2, 10)
    loader = build_train_loader(data_cfg(tmp_path), batch_size=10, seed=0, rank=0, world_size=1)
    batches = take(loader, 30)
    drop_image = torch.cat([b["drop_image"] for b in batches]).float().mean().item()
    no_text = np.mean([c == "" for b in batches for c in b["captions"]])
    assert abs(drop_image - 0.3) < 0.08 and abs(no_text - 0.3) < 0.08


def test_shard_specs_and_config_errors(tmp_path):
    make_dataset(tmp_path, 3, 2)
    brace = expand_shards(str(tmp_path / "{00000..00002}.tar"))
    assert brace == expand_shards(str(tmp_path / "*.tar")) == expand_shards([str(p) for p in brace])
    piped = build_train_loader(data_cfg(tmp_path, shards=[f"pipe:cat {p}" for p in brace], shuffle_buffer=0),
                               batch_size=6, seed=0, rank=0, world_size=1)
    assert sorted(take(piped, 1)[0]["keys"]) == [f"{i:06d}" for i in range(6)]
    with pytest.raises(ValueError, match="matched no shards"):
        expand_shards(str(tmp_path / "nothing*.tar"))
    with pytest.raises(ValueError, match="unknown data key"):
        section({"shards": "x", "resolutoin": 5}, "data", DataConfig)
    with pytest.raises(ValueError, match="sum to"):
        section({"shards": "x", "drop_image_prob": 0.6, "drop_text_prob": 0.6}, "data", DataConfig)


def test_yaml_config_is_the_default_layout():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/data/webdataset.yaml")
    cfg.shards = "x/*.tar"
    data = section(cfg, "data", DataConfig)
    assert (data.resolution, data.clip_image_size, data.random_crop) == (1024, 224, False)
    assert data.clip_mean == CLIP_MEAN and data.clip_std == CLIP_STD and data.max_image_pixels == 178956970


def test_truncated_shard_with_manifest_counts_lost_samples_and_resumes_exactly(tmp_path):
    all_keys = make_dataset(tmp_path, 3, 6)
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2])
    cfg = data_cfg(tmp_path, shuffle_buffer=5)
    build = lambda **kw: build_train_loader(cfg, batch_size=2, seed=0, rank=0, world_size=1, **kw)  # noqa: E731
    full = build()
    keys = keys_of(take(full, 12))
    first_epoch = set(keys[:len(set(keys))])
    lost = 6 - len([k for k in first_epoch if 6 <= int(k) < 12])
    assert first_epoch <= set(all_keys) and len(first_epoch) == 18 - lost and lost >= 1
    assert full.skipped()["truncated tar"] >= lost  # padded to the manifest count: one per lost sample
    head = build()
    take(head, 5)
    resumed = build()
    resumed.load_state_dict(head.state_dict())
    assert keys_of(take(resumed, 7)) == keys[10:]


def test_all_bad_data_raises_instead_of_hanging(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes([Sample(f"{i}", {"txt": b"no image"}) for i in range(3)]))
    with pytest.raises(RuntimeError, match="no decodable sample"):
        take(build_train_loader(data_cfg(tmp_path), batch_size=1, seed=0, rank=0, world_size=1), 1)


def test_reference_augmentation_changes_only_what_the_image_encoder_sees(tmp_path):
    make_dataset(tmp_path, 2, 6)
    plain = take(build_train_loader(data_cfg(tmp_path), batch_size=4, seed=5, rank=0, world_size=1), 2)
    shuffled = take(build_train_loader(data_cfg(tmp_path, reference_shuffle_grid=4), batch_size=4, seed=5, rank=0,
                                       world_size=1), 2)
    cropped = take(build_train_loader(data_cfg(tmp_path, reference_crop=[0.2, 0.4]), batch_size=4, seed=5, rank=0,
                                      world_size=1), 2)
    for a, s, c in zip(plain, shuffled, cropped):
        # Same samples, targets, conditioning and dropout draws: the augmentation is drawn last.
        for key in ("keys", "captions"):
            assert a[key] == s[key] == c[key]
        for key in ("pixel_values", "drop_image", "crop_coords_top_left"):
            assert torch.equal(a[key], s[key]) and torch.equal(a[key], c[key])
        ref, shuf, crop = a["clip_pixel_values"], s["clip_pixel_values"], c["clip_pixel_values"]
        assert crop.shape == ref.shape == shuf.shape  # the encoder's size either way
        # Patch shuffle permutes tiles: every pixel kept (same colour histogram), layout changed.
        assert torch.equal(torch.sort(shuf.reshape(len(shuf), -1, 3), dim=1).values,
                           torch.sort(ref.reshape(len(ref), -1, 3), dim=1).values)
        assert not torch.equal(shuf, ref) and not torch.equal(crop, ref)
    with pytest.raises(ValueError, match=r"data.reference_crop=\[0.5, 0.2\] — give \[low, high\]"):
        section(data_cfg(tmp_path, reference_crop=[0.5, 0.2]), "data", DataConfig)


def test_worker_batches_arrive_in_shared_memory_equal_to_in_process_ones(tmp_path):
    make_dataset(tmp_path, 2, 4)
    here = take(build_train_loader(data_cfg(tmp_path, num_workers=0), batch_size=2, seed=1, rank=0, world_size=1), 3)
    there = take(build_train_loader(data_cfg(tmp_path, num_workers=1), batch_size=2, seed=1, rank=0, world_size=1), 3)
    for a, b in zip(here, there):
        assert a["keys"] == b["keys"]
        for key in ("pixel_values", "clip_pixel_values"):
            assert b[key].dtype == torch.uint8 and b[key].is_shared() and torch.equal(a[key], b[key])
