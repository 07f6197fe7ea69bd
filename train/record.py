"""The export folder of a run or a checkpoint: weights, model card, training record, sample grid.

Both the end of a run and ``python -m train.export`` build the record from the same inputs: the
run's resolved config (``config.yaml``, also in every checkpoint), the checkpoint identity, the
step and samples seen, and the validation reports under ``RUN/eval/``. Nothing that names a
local folder enters it: bases and image encoders go through ``instantstyle.model_ids``, and
any other path keeps only its last part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from instantstyle import __version__
from instantstyle.adapter import blocks_from_metadata
from instantstyle.model_card import RECORD_FORMAT, write_share_files
from instantstyle.model_ids import portable_id

TRAINER_KEYS = ("lr_scheduler", "warmup_steps", "mixed_precision", "ema", "seed", "noise_offset", "snr_gamma",
                "content_scale", "content_normalize", "max_grad_norm")
DATA_KEYS = ("resolution", "buckets", "random_crop", "random_flip", "drop_image_prob", "drop_text_prob",
             "drop_both_prob", "reference_crop", "reference_flip_prob", "reference_shuffle_grid")
EXPORT_NAME = "ip-adapter.safetensors"  # the weights file of every export (DESIGN.md)
EXPORT_FOLDER = "export"  # RUN/export/: what to upload; RUN/ip-adapter.safetensors is a link to its weights


def model_ids(cfg: DictConfig, base_path: str, image_encoder: str) -> tuple[str, str]:
    """(base, image encoder) as shareable ids; ``model.hub_id`` names a local copy of a Hub model."""
    hub_id = OmegaConf.select(cfg, "model.hub_id", default=None)
    encoder_repo = image_encoder.partition(":")[0]
    same_repo = hub_id and Path(encoder_repo).expanduser().resolve() == Path(base_path).expanduser().resolve()
    return portable_id(base_path, hub_id), portable_id(image_encoder, hub_id if same_repo else None)


def scrub(value: Any) -> Any:
    """``value`` with every absolute or home-relative path string cut to its last part."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or os.path.isabs(value)):
        return Path(value).name
    return value


def data_size(cfg: DictConfig) -> dict:
    """Shard and sample counts of ``data.shards`` (None where the shards or their manifest are not here)."""
    from data_tools.shards import expand_shards, shard_sample_counts

    try:
        urls = expand_shards(OmegaConf.select(cfg, "data.shards"))
        counts = shard_sample_counts(urls)
    except Exception:  # noqa: BLE001 - the shards may live on another machine; the size is then unknown
        return {"shards": None, "samples": None}
    if not urls:
        return {"shards": None, "samples": None}
    return {"shards": len(urls), "samples": None if None in counts else sum(counts)}


def validation_reports(run_dir: Path | None, step: int) -> dict:
    """First and last validation means up to ``step`` (RUN/eval/step-*/metrics.json); the first is the baseline."""
    reports = []
    for path in sorted(run_dir.glob("eval/step-*/metrics.json")) if run_dir else []:
        at = int(path.parent.name.removeprefix("step-"))
        if at <= step:
            mean = json.loads(path.read_text())["settings"][0]["mean"]
            reports.append((at, mean))
    if not reports:
        return {}
    (first, first_mean), (last, last_mean) = reports[0], reports[-1]
    return {"first": {"step": first, "mean": first_mean}, "final": {"step": last, "mean": last_mean}}


def sample_grid(run_dir: Path | None, step: int) -> Path | None:
    """The validation grid of the last evaluation up to ``step``, if the run had style references."""
    grids = [p for p in sorted(run_dir.glob("eval/step-*/grid.png")) if int(p.parent.name[5:]) <= step] if run_dir else []
    return grids[-1] if grids else None


def training_record(cfg: DictConfig, *, identity: dict, step: int, samples_seen: int | None, share: dict,
                    ids: tuple[str, str], run_dir: Path | None = None, summary: dict | None = None) -> dict:
    """The machine-readable record of what made the adapter (written as training.json)."""
    def get(key: str) -> Any:  # a checkpoint from an older version may lack a key: recorded as null
        return _plain(OmegaConf.select(cfg, key, default=None))

    world = int(identity.get("world_size", 1))
    batch = get("trainer.batch_size")
    record = {
        "format": RECORD_FORMAT, "framework_version": __version__, "family": share["family"],
        "base_model": ids[0], "image_encoder": ids[1],
        "adapter": {"type": identity["adapter_type"], "target_blocks": list(blocks_from_metadata(identity["target_blocks"])),
                    "num_tokens": int(identity["num_tokens"]), "image_embed_dim": int(identity["image_embed_dim"]),
                    "resampler_dim": int(identity["resampler_dim"]) if identity["adapter_type"] == "ip_adapter_plus" else None, "trained_layers": share["trained_layers"],
                    "all_layers": share["all_layers"], "weights_file": share["weights_file"],
                    "dtype": share["dtype"], "layout": share.get("layout", "full"),
                    "init_from": get("adapter.init_from")},
        "usage": share["usage"],
        "training": {"steps": step, "max_steps": get("trainer.max_steps"), "samples_seen": samples_seen,
                     "global_batch": batch * (get("trainer.gradient_accumulation_steps") or 1) * world if batch else None,
                     "world_size": world, "lr": get("optim.lr"),
                     "optimizer": str(get("optim._target_") or "").rsplit(".", 1)[-1] or None,
                     **{k: get(f"trainer.{k}") for k in TRAINER_KEYS}},
        "data": {**data_size(cfg), **{k: get(f"data.{k}") for k in DATA_KEYS}},
        "metrics": {"final_loss": (summary or {}).get("final_loss"),
                    "validation": validation_reports(run_dir, step)},
    }
    return scrub(record)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def write_export_folder(folder: Path, cfg: DictConfig, *, identity: dict, step: int, samples_seen: int | None,
                        share: dict, ids: tuple[str, str], run_dir: Path | None = None,
                        summary: dict | None = None) -> dict:
    """Card, record and sample grid beside the weights already written in ``folder``; returns the record."""
    record = training_record(cfg, identity=identity, step=step, samples_seen=samples_seen, share=share, ids=ids,
                             run_dir=run_dir, summary=summary)
    write_share_files(folder, record, sample_grid(run_dir, step))
    return record


def share_run(run, cfg: DictConfig, ids: tuple[str, str], folder: Path) -> dict:
    """Card, record and samples of a finished run (``train.run.Run``) beside its weights in ``folder``."""
    from train.families import denoiser, share_info

    share = share_info(run.base.family, denoiser(run.base), run.adapter, weights_file=EXPORT_NAME, dtype="fp32")
    return write_export_folder(folder, cfg, identity=run.identity, step=run.step, share=share, ids=ids,
                               samples_seen=run.summary.get("samples_seen"), run_dir=run.run_dir, summary=run.summary)


def link_weights(source: Path, link: Path) -> Path:
    """``link`` becomes the same file as ``source`` (a hard link; a copy where the disk has none)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or one without hard links
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, link)
    return link
