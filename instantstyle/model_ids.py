"""Names of base models and image encoders that mean the same thing on every machine.

An export is shared: a local folder such as ``/home/me/models/sdxl`` means nothing to its
reader and tells them about the writer's disk. What is recorded instead is the Hub id
(given, or recovered from a Hugging Face cache folder), else the folder's name plus a
content hash of its configs, which two copies of the same model share.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Config files whose bytes identify a diffusers / transformers model folder (weights are not read).
CONFIG_FILES = ("model_index.json", "config.json", "unet/config.json", "transformer/config.json")
# huggingface_hub's cache layout: .../models--ORG--NAME/snapshots/REVISION/...
CACHE_FOLDER = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+")


def is_hub_id(ref: str) -> bool:
    """True for ``org/name`` that is not a folder here (the same test the loaders use)."""
    from .models import looks_local

    return bool(ref) and not looks_local(ref)


def offline_download_hint(*refs: str | None) -> str:
    """For a model that could not be read: with HF_HUB_OFFLINE set, the ``hf download`` commands that fetch
    the hub ids among ``refs`` (folders, hub ids, ``REPO:SUBFOLDER``); else "". Loaders then only read the
    Hugging Face cache, and their own message ("no file named config.json") hides that nothing was fetched.
    """
    from huggingface_hub import constants

    repos = dict.fromkeys(r.partition(":")[0] for r in refs if r and is_hub_id(r.partition(":")[0]))
    if not (constants.HF_HUB_OFFLINE and repos):
        return ""
    downloads = " and ".join(f"`hf download {repo}`" for repo in repos)
    return (f" — HF_HUB_OFFLINE is set, so only the Hugging Face cache is read: run {downloads} where there "
            "is network, into the same HF_HOME, or give a local folder instead")


def config_hash(folder: Path) -> str:
    """First 12 hex digits of the SHA-256 of the folder's config files (empty when it has none)."""
    digest, found = hashlib.sha256(), False
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest()[:12] if found else ""


def portable_id(ref: str, hub_id: str | None = None) -> str:
    """``ref`` (a folder, a hub id, or ``REPO:SUBFOLDER``) as it may appear in a shared file.

    A Hub id stays as it is; ``hub_id`` (from ``model.hub_id``) names a local copy; a folder in
    the Hugging Face cache becomes its id; any other folder becomes ``NAME@sha256-HASH`` (the hash of its configs).
    """
    if not ref:
        return ""
    repo, sep, sub = ref.partition(":")
    if len(repo) == 1 and sep:  # a Windows drive letter, not REPO:SUBFOLDER
        repo, sep, sub = ref, "", ""
    suffix = f":{sub}" if sub else ""
    if hub_id:
        return hub_id + suffix
    if is_hub_id(repo):
        return ref
    cached = CACHE_FOLDER.search(str(Path(repo).expanduser()))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}{suffix}"
    folder = Path(repo).expanduser()
    digest = config_hash(folder / sub if sub else folder)
    # No ":" inside the hash part: the result still reads as REPO:SUBFOLDER.
    return f"{folder.resolve().name}{f'@sha256-{digest}' if digest else ''}{suffix}"


def same_model(recorded: str, ref: str, hub_id: str | None = None) -> bool:
    """True when ``ref`` (a local folder or id) is the model a file recorded as ``recorded``."""
    return recorded in (ref, portable_id(ref, hub_id))
