"""Decode every sample of every shard and report counts, sizes, captions and bad samples.

    python -m data_tools.check_shards DIR_OR_GLOB   (also: python -m data_tools.inspect)

Exit status 1 when any sample (or shard) is bad, 0 otherwise. Decoding is
the training loader's own (images, text, JSON only), so what passes here
loads in training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from data_tools.buckets import bucket_histogram, format_histogram, sdxl_buckets
from data_tools.decode import BadSample, decode_caption, decode_meta, decode_rgb, image_member, open_image
from data_tools.shards import NotATar, TruncatedTar, expand_shards, iter_samples, manifest_counts, open_shard
from instantstyle.generate import HelpFormatter

UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "npy")
SIZE_BUCKETS = (256, 512, 1024, 2048)


@dataclass
class ShardReport:
    """What one shard holds."""

    name: str
    samples: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)


def resolve(spec: str) -> list[str]:
    """A directory (its *.tar), a glob, a brace pattern or a URL → shard list; SystemExit if none."""
    if os.path.isdir(spec):
        spec = os.path.join(spec, "*.tar")
    try:
        return expand_shards(spec)
    except ValueError:
        raise SystemExit(f"error: {spec!r} matches no shards — give a shard directory, glob or brace pattern") from None


def check_sample(members: dict[str, bytes], max_pixels: int) -> tuple[tuple[int, int], str]:
    """(width, height) and caption of a sample; BadSample naming what is wrong."""
    unsafe = sorted(ext for ext in members if ext.rsplit(".", 1)[-1] in UNSAFE_EXTS)
    if unsafe:
        raise BadSample("pickle-capable member", f".{unsafe[0]} (never decoded; remove it from the shard)")
    data = image_member(members)
    caption = decode_caption(members)
    decode_meta(members)
    image = decode_rgb(open_image(data, max_pixels))
    return image.size, caption


def inspect_shard(url: str, max_pixels: int, expected: int | None) -> ShardReport:
    """Decode every sample of one shard."""
    report = ShardReport(os.path.basename(url) if "://" not in url else url)
    try:
        with open_shard(url) as stream:
            for raw in iter_samples(stream, url):
                report.samples += 1
                try:
                    size, caption = check_sample(raw.members, max_pixels)
                except BadSample as error:
                    report.bad.append((raw.key, str(error)))
                    continue
                report.sizes.append(size)
                report.caption_words.append(len(caption.split()))
    except NotATar as error:
        report.bad.append(("-", f"not a tar ({error})"))
    except (TruncatedTar, OSError) as error:
        report.bad.append(("-", f"truncated or unreadable tar after {report.samples} samples ({error})"))
    if expected is not None and expected != report.samples and not report.bad:
        report.bad.append(("-", f"manifest says {expected} samples, shard has {report.samples}"))
    return report


def size_histogram(sizes: list[tuple[int, int]]) -> Counter:
    """Counts of images by their longer side, in buckets."""
    labels = [f"< {SIZE_BUCKETS[0]}"] + [f"{a}–{b - 1}" for a, b in zip(SIZE_BUCKETS, SIZE_BUCKETS[1:])]
    labels.append(f"≥ {SIZE_BUCKETS[-1]}")
    counts = Counter({label: 0 for label in labels})
    for width, height in sizes:
        counts[labels[sum(max(width, height) >= b for b in SIZE_BUCKETS)]] += 1
    return counts


def print_report(reports: list[ShardReport]) -> int:
    """Print the tables; return the number of bad entries."""
    print(f"{'shard':<24} {'samples':>8} {'bad':>5}")
    for r in reports:
        print(f"{r.name:<24} {r.samples:>8} {len(r.bad):>5}")
    total = sum(r.samples for r in reports)
    print(f"{'total':<24} {total:>8} {sum(len(r.bad) for r in reports):>5}\n")
    sizes = [s for r in reports for s in r.sizes]
    print("longer image side:")
    for label, n in size_histogram(sizes).items():
        print(f"  {label:>10}: {n}")
    small = sum(min(s) < 1024 for s in sizes)
    print(f"  ({small} of {len(sizes)} have a shorter side < 1024 and get upscaled at SDXL resolution)\n")
    print("SDXL aspect buckets around 1024² (data.buckets=sdxl):")
    print(format_histogram(bucket_histogram(sizes, sdxl_buckets(1024))) + "\n")
    words = [w for r in reports for w in r.caption_words]
    if words:
        print(f"caption words: min {min(words)}, median {statistics.median(words):g}, "
              f"mean {statistics.mean(words):.1f}, max {max(words)}, empty {words.count(0)}\n")
    bad = [(r.name, key, reason) for r in reports for key, reason in r.bad]
    for shard, key, reason in bad:
        print(f"BAD {shard} {key}: {reason}")
    print(f"{len(bad)} bad" if bad else "all samples decode")
    return len(bad)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; exit status 1 when anything is bad."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.check_shards",
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("shards", help="shard directory, glob ('d/*.tar') or brace pattern ('d/{00000..00009}.tar')")
    parser.add_argument("--max-image-pixels", type=int, default=178956970, help="same guard as training")
    args = parser.parse_args(argv)
    urls = resolve(args.shards)
    counts = {}
    for folder in {os.path.dirname(u) for u in urls if "://" not in u and not u.startswith("pipe:")}:
        counts.update({os.path.join(folder, k): v for k, v in manifest_counts(folder).items()})
    reports = [inspect_shard(u, args.max_image_pixels, counts.get(u)) for u in tqdm(urls, desc="inspect", unit="shard")]
    return 1 if print_report(reports) else 0


if __name__ == "__main__":
    sys.exit(main())
