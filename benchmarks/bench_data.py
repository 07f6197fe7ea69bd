"""Throughput of our shard pipeline vs the IP-Adapter tutorial's loading, same workers and batch size.

    python -m benchmarks.bench_data [--num 1000 --side 1500 --workers 2 --resolution 1024 --repeats 3]

All produce SDXL pixels at `--resolution` plus a 224 px CLIP input; none
tokenises (the training task does that). The photos mix aspect ratios (1:1 to 16:9,
landscape and portrait): our loader runs once with square crops and once with SDXL's
aspect-ratio buckets scaled to `--resolution` (`data.buckets=sdxl`, one bucket per batch). Images are photo-like JPEGs
(gradients, shapes, grain) so file sizes and decode costs are realistic;
they are cached in `--cache` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_tools.shards import Manifest, Sample, ShardRecord, sample_key, shard_name, write_manifest, write_shard
from train.data import build_train_loader


def make_photo(rng: np.random.Generator, side: int) -> Image.Image:
    """A photo-like image: smooth lighting, blurred shapes, sensor grain; longer side = `side`."""
    aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
    width, height = (side, int(side / aspect)) if rng.random() < 0.6 else (int(side / aspect), side)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 220, 3) + rng.uniform(-60, 60, 3) * (x / width)[..., None] + rng.uniform(-60, 60, 3) * (y / height)[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 20, width // 3), rng.integers(height // 20, height // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8))


def ensure_images(folder: Path, num: int, side: int) -> list[Path]:
    """Create (or reuse) `num` photo-like JPEGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(num)]
    for i, path in enumerate(tqdm(paths, desc="images", unit="img")):
        if not path.exists():
            make_photo(np.random.default_rng(i), side).save(path, format="JPEG", quality=90)
    return paths


def ensure_shards(folder: Path, images: list[Path], per_shard: int) -> str:
    """Pack the images into shards (reused when the manifest already covers them); returns the glob."""
    manifest = Manifest(options={"bench_images": len(images), "per_shard": per_shard}, complete=True)
    if (folder / "manifest.json").is_file() and json.loads((folder / "manifest.json").read_text())["options"] == manifest.options:
        return str(folder / "*.tar")
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(images), per_shard)):
        samples = [Sample(sample_key(i), {"jpg": images[i].read_bytes(), "txt": f"a photo {i}".encode(), "json": b"{}"})
                   for i in range(start, min(len(images), start + per_shard))]
        nbytes = write_shard(folder / shard_name(shard), samples)
        manifest.shards.append(ShardRecord(shard_name(shard), len(samples), nbytes))
    write_manifest(folder, manifest)
    return str(folder / "*.tar")


class TutorialDataset(Dataset):
    """IP-Adapter tutorial_train_sdxl.py's MyDataset (minus tokenising), without torchvision."""

    def __init__(self, json_file: Path, image_root: Path, size: int) -> None:
        from transformers import CLIPImageProcessor

        self.data = json.loads(json_file.read_text())
        self.image_root, self.size = image_root, size
        self.clip_image_processor = CLIPImageProcessor()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        item = self.data[idx]
        raw_image = Image.open(os.path.join(self.image_root, item["image_file"]))
        original_size = torch.tensor([raw_image.height, raw_image.width])
        image = raw_image.convert("RGB")
        # transforms.Resize(size, BILINEAR) → ToTensor() → Normalize([0.5], [0.5])
        w, h = image.size
        new = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
        tensor = torch.from_numpy(np.array(image.resize(new, Image.BILINEAR))).permute(2, 0, 1).float() / 255.0
        tensor = (tensor - 0.5) / 0.5
        top, left = (tensor.shape[1] - self.size) // 2, (tensor.shape[2] - self.size) // 2
        image_tensor = tensor[:, top:top + self.size, left:left + self.size]
        clip_image = self.clip_image_processor(images=raw_image, return_tensors="pt").pixel_values
        return {"image": image_tensor, "text": item["text"], "clip_image": clip_image, "original_size": original_size,
                "crop_coords_top_left": torch.tensor([top, left]), "target_size": torch.tensor([self.size, self.size])}


def tutorial_collate(data: list[dict]) -> dict:
    """The tutorial's collate_fn (minus token ids)."""
    return {"images": torch.stack([d["image"] for d in data]), "clip_images": torch.cat([d["clip_image"] for d in data]),
            "texts": [d["text"] for d in data], "original_size": torch.stack([d["original_size"] for d in data]),
            "crop_coords_top_left": torch.stack([d["crop_coords_top_left"] for d in data]),
            "target_size": torch.stack([d["target_size"] for d in data])}


def throughput(batches, num_batches: int, batch_size: int, desc: str) -> tuple[float, float]:
    """(steady samples/s after the first batch, end-to-end samples/s incl. start-up)."""
    start = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter()
    for _ in tqdm(islice(iterator, num_batches - 1), total=num_batches - 1, desc=desc, unit="batch"):
        pass
    end = time.perf_counter()
    return (num_batches - 1) * batch_size / (end - first), num_batches * batch_size / (end - start)


def main(argv: list[str] | None = None) -> None:
    """Build the data once, time both pipelines, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--side", type=int, default=1500, help="longer side of the synthetic photos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table gives their median")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "instantstyle_bench_data")
    args = parser.parse_args(argv)
    root = args.cache / f"side{args.side}"
    images = ensure_images(root / "images", args.num, args.side)
    (root / "data.json").write_text(json.dumps([{"image_file": p.name, "text": f"a photo {i}"} for i, p in enumerate(images)]))
    shards = ensure_shards(root / f"shards{args.num}", images, per_shard=max(1, args.num // (4 * max(1, args.workers))))
    num_batches = args.num // args.batch_size
    mb = sum(p.stat().st_size for p in images) / len(images) / 1e6
    tutorial = DataLoader(TutorialDataset(root / "data.json", root / "images", args.resolution), batch_size=args.batch_size,
                          shuffle=True, num_workers=args.workers, collate_fn=tutorial_collate)
    settings = {"shards": shards, "resolution": args.resolution, "num_workers": args.workers, "shuffle_buffer": 100}
    ours = build_train_loader(settings, batch_size=args.batch_size, seed=0, rank=0, world_size=1)
    bucketed = build_train_loader({**settings, "buckets": "sdxl"}, batch_size=args.batch_size, seed=0, rank=0,
                                  world_size=1)
    pipelines = {"IP-Adapter tutorial (JSON + PIL + CLIPImageProcessor)": tutorial,
                 "ours (WebDataset shards, train/data.py)": ours,
                 "ours + SDXL aspect buckets (data.buckets=sdxl)": bucketed}
    # Rounds interleave the pipelines, so a burst of load from elsewhere hits all of them, not one.
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for round_ in range(args.repeats):
        for name, loader in pipelines.items():
            runs[name].append(throughput(loader, num_batches, args.batch_size, f"{name.split(' (')[0]} {round_ + 1}"))
    print(f"\n{args.num} JPEGs, longer side {args.side} px (mean {mb:.2f} MB), {args.workers} workers, "
          f"batch {args.batch_size}, {args.resolution} px + 224 px CLIP, {os.cpu_count()} CPU cores, "
          f"median of {args.repeats} interleaved rounds\n")
    print("| pipeline | samples/s (steady) | range over rounds | samples/s (incl. start-up) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(steady for steady, _ in next(iter(runs.values())))
    for name, rounds in runs.items():
        steady = [s for s, _ in rounds]
        median = statistics.median(steady)
        print(f"| {name} | {median:.1f} | {min(steady):.1f}–{max(steady):.1f} | "
              f"{statistics.median(t for _, t in rounds):.1f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
