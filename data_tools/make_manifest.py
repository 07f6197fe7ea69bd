"""Write manifest.json for existing shards, whatever tool made them (img2dataset, webdataset.ShardWriter, tar).

    python -m data_tools.make_manifest DIR_OR_GLOB

Counts the samples of every shard (members grouped by key, as training reads them; nothing is decoded)
and writes `manifest.json` beside them in the format of `data_tools.shards`. With the counts, training
splits an epoch evenly across ranks and workers and resumes by skipping whole shards. An existing
manifest keeps its other shards and options; an embedding cache's manifest is never replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from data_tools.shards import (Manifest, ShardRecord, TruncatedTar, expand_shards, iter_samples, open_shard,
                               read_manifest, write_manifest)
from instantstyle.generate import HelpFormatter


class ManifestError(ValueError):
    """Shards whose counts cannot be written; the message is one line."""


def count_samples(path: str) -> int:
    """Samples in one shard (ManifestError when it is cut short or is no tar)."""
    progress = [0]
    try:
        with open_shard(path) as stream:
            for _ in iter_samples(stream, path, keep=lambda i: False, progress=progress):
                pass
    except (TruncatedTar, OSError) as err:
        raise ManifestError(f"{path} is damaged after {progress[0]} samples ({err}); python -m "
                            "data_tools.check_shards names the problem; fix or remove the shard, then run again") from None
    return progress[0]


def local_shards(spec: str) -> dict[Path, list[str]]:
    """Shard paths by folder; a folder means its *.tar. ManifestError for remote or missing shards."""
    try:
        urls = expand_shards(spec)
    except ValueError as err:
        raise ManifestError(str(err)) from None
    if any(u.startswith("pipe:") or "://" in u for u in urls):
        raise ManifestError("a manifest sits beside local shards; copy remote shards to a folder first")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ManifestError(f"{missing[0]} is not a file ({len(missing)} of {len(urls)} shards)")
    folders: dict[Path, list[str]] = {}
    for url in urls:
        folders.setdefault(Path(url).resolve().parent, []).append(url)
    return folders


def updated_manifest(folder: Path, counted: list[ShardRecord]) -> Manifest:
    """The folder's manifest with these shards' records replaced; records of shards that are gone dropped."""
    old = read_manifest(folder) or Manifest()
    if "cache" in old.options:
        raise ManifestError(f"{folder} holds an embedding cache; its manifest is data_tools.precompute's")
    names = {r.name for r in counted}
    kept = [r for r in old.shards if r.name not in names and (folder / r.name).is_file()]
    shards = sorted(kept + counted, key=lambda r: r.name)
    return Manifest(shards, old.skipped, complete=True, options=old.options)


def make_manifests(spec: str) -> list[tuple[Path, Manifest]]:
    """Count every shard of ``spec`` and write each folder's manifest; returns what was written."""
    written = []
    for folder, urls in local_shards(spec).items():
        updated_manifest(folder, [])  # an embedding cache is refused before any counting
        with tqdm(urls, desc=f"count {folder.name}", unit="shard") as bar:  # closed before an error line
            records = [ShardRecord(os.path.basename(u), count_samples(u), os.path.getsize(u)) for u in bar]
        manifest = updated_manifest(folder, records)
        write_manifest(folder, manifest)
        written.append((folder, manifest))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; exit status 2 with one line when a shard cannot be counted."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_manifest", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("shards", help="shard folder, glob ('d/*.tar') or brace pattern ('d/{00000..00009}.tar')")
    args = parser.parse_args(argv)
    try:
        written = make_manifests(args.shards)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder, manifest in written:
        print(f"wrote {folder / 'manifest.json'}: {manifest.num_samples} samples in {len(manifest.shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
