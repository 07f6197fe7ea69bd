"""Run the frozen encoders once over image shards and write an embedding cache (`data=cached` trains from it).

    python -m data_tools.precompute --base DIR --shards 'DATA/*.tar' --out CACHE [--resolution 1024]
        [--buckets none|sdxl] [--adapter-type ip_adapter|ip_adapter_plus] [--dtype fp16|bf16|fp32]
    accelerate launch -m data_tools.precompute ...   (rank r of w takes shards[r::w])

Every image is cropped exactly as the training loader crops it without augmentation (centred,
no flip: `data_tools.transforms`), then encoded by the VAE, both text encoders and the image
encoder (a FLUX.1 base: its VAE, CLIP pooled and T5 sequence, as `model=flux` training encodes
them); `data_tools.embedding_cache` says what is stored and why. Deterministic: the same inputs
give byte-identical shards. Resumable: shards are written atomically under their source names, so
a killed run started again skips the finished ones. Every chunk is encoded at `--batch-size` rows
(padded), which makes the values bitwise those of live training at that batch size.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from data_tools.buckets import nearest_bucket, parse_buckets
from data_tools.embedding_cache import (DTYPES, VIEWS_KEY, cache_identity, encode_sample, identity_mismatch,
                                        save_empty_prompt, source_id)
from data_tools.decode import BadSample, decode_caption, decode_meta, image_member, open_image, upright_size
from data_tools.shards import (Manifest, Sample, ShardRecord, TruncatedTar, expand_shards, iter_samples, open_shard,
                               read_manifest, write_manifest, write_shard)
from data_tools.toy_data import CLIP_MEAN, CLIP_STD
from data_tools.augment import augmented_view
from data_tools.transforms import original_size, prepare_image
from instantstyle.augment import ReferenceAugment
from instantstyle.content import encode_image
from instantstyle.encode import clip_input, latent_distribution, pad_rows
from instantstyle.errors import OutputPathError
from instantstyle.quiet import quiet_libraries
from instantstyle.safe_paths import check_output_dir, make_output_dir
from instantstyle.threads import configure_cpu_threads

if TYPE_CHECKING:  # diffusers loads with the base (after quiet_libraries), not with this module
    from instantstyle.flux_models import FluxBase
    from instantstyle.models import BaseModel

FLUX_PIPELINE = "FluxPipeline"  # model_index.json's class of a FLUX.1 base

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_tools.precompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="diffusers base folder or hub id (what training's model.path names)")
    parser.add_argument("--image-encoder", default=None, help="REPO:SUBFOLDER or folder; default BASE/image_encoder")
    parser.add_argument("--shards", required=True, help="source image shards: glob, brace pattern or list")
    parser.add_argument("--out", required=True, type=Path, help="cache folder (shards + manifest.json)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--buckets", default="none", help="none | sdxl (the same as training's data.buckets)")
    parser.add_argument("--adapter-type", default="ip_adapter", choices=("ip_adapter", "ip_adapter_plus"))
    parser.add_argument("--clip-image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per encoder call; train with this batch size "
                        "for values bitwise equal to live encoding")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES), help="stored tensors (encoders run in fp32)")
    parser.add_argument("--max-image-pixels", type=int, default=178956970)
    parser.add_argument("--reference-views", type=int, default=0,
                        help="augmented reference views per image (0 = none); training draws one per sample and epoch")
    parser.add_argument("--reference-crop", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="area fraction of the views' independent crop (data.reference_crop)")
    parser.add_argument("--reference-flip-prob", type=float, default=0.0, help="(data.reference_flip_prob)")
    parser.add_argument("--reference-shuffle-grid", type=int, default=1, help="(data.reference_shuffle_grid)")
    parser.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill
    return parser.parse_args(argv)


def prepare(raw, args: argparse.Namespace, buckets) -> dict:
    """A source sample cropped as training crops it (centred, no flip), with its conditioning; BadSample to skip."""
    if raw.error:
        raise BadSample(raw.error)
    data, caption, meta = image_member(raw.members), decode_caption(raw.members), decode_meta(raw.members)
    image = open_image(data, args.max_image_pixels)
    size = (args.resolution,) * 2 if buckets is None else nearest_bucket(*upright_size(image), buckets)
    augment = reference_augment(args)
    prepared = prepare_image(image, size, args.clip_image_size,
                             keep_decoded=augment is not None and augment.crop_scale is not None)
    views = reference_views(prepared, augment, args.reference_views, raw.key)
    return {"key": raw.key, "caption": caption, "pixels": torch.from_numpy(prepared.pixels.copy()),
            "clip_pixels": torch.from_numpy(prepared.clip_pixels.copy()), "bucket": size, "views": views,
            "meta": {"key": raw.key, "caption": caption, "original_size": list(original_size(meta, prepared.original_size)),
                     "crop_top_left": list(prepared.crop_top_left), "target_size": [size[1], size[0]]}}


def reference_augment(args: argparse.Namespace) -> ReferenceAugment | None:
    """The views' augmentation, or None without ``--reference-views``."""
    if args.reference_views < 1:
        return None
    return ReferenceAugment.of(args.reference_crop, args.reference_flip_prob, args.reference_shuffle_grid,
                               args.clip_image_size)


def reference_views(prepared, augment: ReferenceAugment | None, count: int, key: str) -> list[torch.Tensor]:
    """``count`` augmented CLIP views of one image, from an RNG seeded by its key (deterministic, resumable)."""
    if augment is None:
        return []
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    return [torch.from_numpy(np.ascontiguousarray(augmented_view(prepared, augment, rng))) for _ in range(count)]


def read_shard(url: str, args: argparse.Namespace, buckets) -> list[dict]:
    """Every decodable sample of one source shard, prepared; bad ones are logged and left out."""
    items = []
    try:
        with open_shard(url) as stream:
            for raw in iter_samples(stream, url):
                try:
                    items.append(prepare(raw, args, buckets))
                except BadSample as error:
                    log.warning("skipping %s in %s (%s)", raw.key, url, error)
    except (TruncatedTar, OSError) as error:
        log.warning("%s is truncated or unreadable after %d samples (%s); caching what was read", url, len(items), error)
    return items


@torch.no_grad()
def encode_items(base: BaseModel, items: list[dict], args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """Per item: latent mean/std, prompt embeds, pooled embeds, image features; every call at batch_size rows."""
    b, out = args.batch_size, [{} for _ in items]
    by_bucket: dict = {}
    for i, item in enumerate(items):
        by_bucket.setdefault(item["bucket"], []).append(i)
    for indices in by_bucket.values():  # the VAE takes one image size per call
        for start in range(0, len(indices), b):
            chunk = indices[start:start + b]
            pixels = pad_rows(torch.stack([items[i]["pixels"] for i in chunk]), b)
            mean, std = latent_distribution(base.vae, pixels)
            for row, i in enumerate(chunk):
                out[i].update(latent_mean=mean[row], latent_std=std[row])
    device = encoder_device(base)
    for start in range(0, len(items), b):
        chunk = list(range(start, min(start + b, len(items))))
        captions = [items[i]["caption"] for i in chunk]
        embeds, pooled = encode_text(base, captions + [captions[-1]] * (b - len(chunk)))
        clip = clip_input(pad_rows(torch.stack([items[i]["clip_pixels"] for i in chunk]), b).to(device), CLIP_MEAN, CLIP_STD)
        features = encode_image(base.image_encoder, clip, args.adapter_type)
        for row, i in enumerate(chunk):
            out[i].update(prompt_embeds=embeds[row], image_features=features[row])
            if pooled is not None:
                out[i]["pooled_prompt_embeds"] = pooled[row]
    encode_views(base, items, out, args)
    dtype = DTYPES[args.dtype]
    return [{k: v.to(dtype) for k, v in tensors.items()} for tensors in out]


def encode_views(base: BaseModel, items: list[dict], out: list[dict], args: argparse.Namespace) -> None:
    """The image encoder's output for every augmented view, stacked per item as ``image_feature_views``."""
    views = [(i, view) for i, item in enumerate(items) for view in item["views"]]
    b, device, encoded = args.batch_size, encoder_device(base), []
    for start in range(0, len(views), b):
        chunk = [view for _, view in views[start:start + b]]
        clip = clip_input(pad_rows(torch.stack(chunk), b).to(device), CLIP_MEAN, CLIP_STD)
        encoded += list(encode_image(base.image_encoder, clip, args.adapter_type)[:len(chunk)])
    for i in range(len(items)):
        mine = [feature for (j, _), feature in zip(views, encoded) if j == i]
        if mine:
            out[i][VIEWS_KEY] = torch.stack(mine)


def cache_shard(base: BaseModel, url: str, target: Path, args: argparse.Namespace, buckets) -> int:
    """Encode one source shard into `target` (atomically); returns its sample count."""
    items = read_shard(url, args, buckets)
    tensors = encode_items(base, items, args) if items else []
    write_shard(target, [Sample(item["key"], encode_sample(t, item["meta"])) for item, t in zip(items, tensors)])
    return len(items)


@torch.no_grad()
def empty_prompt(base: BaseModel, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The empty caption's embeddings, as a row of a batch_size call (what live text dropout encodes)."""
    embeds, pooled = encode_text(base, [""] * batch_size)
    return embeds[0], None if pooled is None else pooled[0]


def is_flux_base(path: str) -> bool:
    """True when `path` (folder or hub id) holds a FLUX.1 pipeline."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path).get("_class_name") == FLUX_PIPELINE
    except (OSError, ValueError):
        return False  # load_base says what is wrong with the folder


def encode_text(base: BaseModel | FluxBase, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, pooled) as this family's training task encodes captions live."""
    if base.family == "flux":
        from instantstyle.flux_models import encode_flux_prompts

        return encode_flux_prompts(base, captions)
    from instantstyle.models import encode_prompts

    return encode_prompts(base, captions)


def encoder_device(base: BaseModel | FluxBase) -> torch.device:
    """Where the frozen encoders run."""
    return base.device if base.family == "flux" else base.unet.device


@torch.no_grad()
def tensor_shapes(base: BaseModel, args: argparse.Namespace, prompt_embeds: torch.Tensor,
                  pooled: torch.Tensor | None) -> dict:
    """The identity's ``shapes``: training checks every cached sample against them before it is batched."""
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)  # the VAE's downscale (diffusers' vae_scale_factor)
    probe = torch.zeros(1, 3, args.clip_image_size, args.clip_image_size, device=encoder_device(base))
    features = encode_image(base.image_encoder, probe, args.adapter_type)
    return {"latent": [int(base.vae.config.latent_channels), factor], "prompt_embeds": list(prompt_embeds.shape),
            "pooled_prompt_embeds": None if pooled is None else list(pooled.shape),
            "image_features": list(features.shape[1:])}


def count_samples(path: Path) -> int:
    """Samples in a finished cache shard (headers only: member data is seeked over)."""
    progress = [0]
    with open_shard(str(path)) as stream:
        for _ in iter_samples(stream, str(path), keep=lambda i: False, progress=progress):
            pass
    return progress[0]


def reference_identity(args: argparse.Namespace) -> dict | None:
    """The views' settings as the manifest records them (training checks them against its data config)."""
    if args.reference_views < 1:
        return None
    return {"views": args.reference_views, "crop": list(args.reference_crop) if args.reference_crop else None,
            "flip_prob": args.reference_flip_prob, "shuffle_grid": args.reference_shuffle_grid}


def load_encoders(args: argparse.Namespace, flux: bool, device: torch.device) -> BaseModel | FluxBase:
    """The frozen base in fp32 (FLUX: its stock pipeline), whose encoders fill the cache."""
    if flux:
        from instantstyle.flux_models import load_flux_base

        return load_flux_base(args.base, image_encoder=args.image_encoder, dtype=torch.float32, device=device)
    from instantstyle.models import load_base

    return load_base(args.base, image_encoder=args.image_encoder, dtype=torch.float32, device=device,
                     check_content=False)


def check_args(args: argparse.Namespace) -> None:
    """Every number in range, before anything is loaded; ``ValueError`` with one line otherwise."""
    crop = args.reference_crop
    checks = [(args.batch_size >= 1, f"--batch-size must be ≥ 1 (got {args.batch_size})"),
              (args.resolution >= 8, f"--resolution must be ≥ 8 (got {args.resolution}): the VAE works on 8-pixel blocks"),
              (args.clip_image_size >= 1, f"--clip-image-size must be ≥ 1 (got {args.clip_image_size})"),
              (args.max_image_pixels >= 1, f"--max-image-pixels must be ≥ 1 (got {args.max_image_pixels})"),
              (args.reference_views >= 0, f"--reference-views must be ≥ 0 (got {args.reference_views})"),
              (args.reference_shuffle_grid >= 1, f"--reference-shuffle-grid must be ≥ 1 (got {args.reference_shuffle_grid})"),
              (0 <= args.reference_flip_prob <= 1, f"--reference-flip-prob must be in [0, 1] (got {args.reference_flip_prob})"),
              (crop is None or 0 < crop[0] <= crop[1] <= 1, f"--reference-crop {crop}: give LOW HIGH with 0 < LOW ≤ HIGH ≤ 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def cache_difference(found: dict, identity: dict) -> str | None:
    """'dtype: cache 'fp16', this run 'bf16'' for the first setting the cache in --out was made with otherwise."""
    mismatch = identity_mismatch(found, identity)
    if mismatch:
        return mismatch
    for key in ("dtype", "encode_batch_size", "reference"):
        if found.get(key) != identity[key]:
            return f"{key}: cache {found.get(key)!r}, this run {identity[key]!r}"
    return None


def existing_cache(out: Path) -> Manifest | None:
    """The manifest of a cache in ``out`` that holds shards; None when there is none (a failed start doesn't count)."""
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or not (manifest.complete or any(out.glob("*.tar"))):
        return None
    return manifest if isinstance(manifest.options.get("cache"), dict) else None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; exit status 2 with one line on a usage mistake, an unusable base or --out."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    quiet_libraries()
    try:
        return run(args)
    except (ValueError, OSError, OutputPathError) as err:  # BaseModelError, bad --shards or --out, full disk
        print(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Cache every shard of ``--shards`` in ``--out`` (what ``main`` does, raising instead of printing)."""
    check_args(args)
    urls = expand_shards(args.shards)
    buckets = parse_buckets(args.buckets, args.resolution)
    names = [os.path.basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("--shards lists two shards with the same file name; cache each folder separately")
    check_output_dir(args.out, f"--out {args.out}")
    from accelerate import PartialState

    state = PartialState()
    flux = is_flux_base(args.base)
    if flux and args.adapter_type != "ip_adapter":
        raise ValueError(f"FLUX adapters read image_embeds; --adapter-type {args.adapter_type} is for SDXL/SD 1.5 bases")
    log.info(configure_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=state.device.type))
    base = load_encoders(args, flux, state.device)
    embeds, pooled = empty_prompt(base, args.batch_size)
    identity = cache_identity(family=base.family, max_sequence_length=base.max_sequence_length if flux else None,
                              shift_factor=base.vae.config.shift_factor,
                              base_model=source_id(base.path), image_encoder=source_id(base.image_encoder_path),
                              adapter_type=args.adapter_type, resolution=args.resolution,
                              buckets=None if buckets is None else [list(b) for b in buckets],
                              clip_image_size=args.clip_image_size, clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
                              dtype=args.dtype, encode_batch_size=args.batch_size,
                              scaling_factor=float(base.vae.config.scaling_factor),
                              shapes=tensor_shapes(base, args, embeds, pooled), reference=reference_identity(args))
    found = existing_cache(args.out)
    mismatch = found and cache_difference(found.options["cache"], identity)
    if mismatch:
        raise ValueError(f"{args.out} holds a cache made differently ({mismatch}); use another --out")
    if state.is_main_process:
        start_cache(args, identity, found, names, (embeds, pooled))
    state.wait_for_everyone()
    done = 0
    for url in tqdm(urls[state.process_index::state.num_processes], desc=f"precompute rank {state.process_index}",
                    unit="shard"):
        target = args.out / os.path.basename(url)
        if target.exists():
            continue  # written atomically: a file there is a finished shard
        cache_shard(base, url, target, args, buckets)
        done += 1
        if args.stop_after and done >= args.stop_after:
            return 0
    state.wait_for_everyone()
    return finish_cache(args, identity, names) if state.is_main_process else 0


def start_cache(args: argparse.Namespace, identity: dict, found: Manifest | None, names: list[str],
                empty: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """The manifest (incomplete) and the empty prompt's embeddings, before any shard.

    A finished cache's manifest keeps its sample counts while a re-run has nothing to add, so killing
    that re-run loses nothing; with shards to add, the counts of the shards already there are kept.
    """
    make_output_dir(args.out, f"--out {args.out}")
    if found is None or not all((args.out / n).exists() for n in names):
        kept = [] if found is None else [r for r in found.shards if (args.out / r.name).exists()]
        write_manifest(args.out, Manifest(kept, options={"cache": identity}))
    embeds, pooled = empty
    dtype = DTYPES[args.dtype]
    save_empty_prompt(args.out, embeds.to(dtype), None if pooled is None else pooled.to(dtype))


def finish_cache(args: argparse.Namespace, identity: dict, names: list[str]) -> int:
    """The complete manifest with every shard's sample count; exit status 2 when nothing could be cached."""
    records = [ShardRecord(n, count_samples(args.out / n), (args.out / n).stat().st_size) for n in names]
    total = sum(r.num_samples for r in records)
    write_manifest(args.out, Manifest(records, complete=True, options={"cache": identity}))
    if total == 0:
        print(f"error: no sample of --shards {args.shards} could be read; check them with "
              f"python -m data_tools.check_shards", file=sys.stderr)
        return 2
    log.info("cached %d samples in %d shards at %s", total, len(records), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
