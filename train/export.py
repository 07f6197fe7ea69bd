"""Export a training checkpoint as a folder to share: weights stock diffusers and ComfyUI load, a model card.

    python -m train.export RUN/checkpoints/checkpoint-00001000 --out FILE [--dtype fp16] [--ema] [--base PATH]

``--out DIR`` writes the export folder DIR (``ip-adapter.safetensors``, ``README.md``, ``training.json``
and ``samples.png`` when the run evaluated style references); ``--out FILE.safetensors`` writes
that file and the card, record and grid beside it, in its folder.

Only the base UNet is loaded (from the checkpoint's ``model.path`` unless ``--base``): inert
layers need its ``to_k`` weights. Broken checkpoint, bad ``--out``, wrong base or block set:
one-line error, exit 2, and no file written. FLUX checkpoints (identity ``family: flux``) export in
the XLabs layout ``FluxPipeline.load_ip_adapter`` reads and need only the transformer's config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instantstyle.generate import HelpFormatter
from instantstyle.quiet import quiet_libraries

# torch and diffusers load inside export_checkpoint, so that --help and usage errors are instant.
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the keys of instantstyle.export.DTYPES
IDENTITY_KEYS = ("base_model", "target_blocks", "adapter_type", "num_tokens", "image_embed_dim", "resampler_dim",
                 "image_encoder")


def read_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.json`` of a complete checkpoint, checked to hold the step and adapter identity."""
    from train.checkpoint import STATE_FILE, CheckpointError

    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"cannot read {path}: {(str(err).splitlines() or [type(err).__name__])[0]}") from err
    identity = state.get("identity") if isinstance(state, dict) else None
    missing = [k for k in IDENTITY_KEYS if not isinstance(identity, dict) or k not in identity]
    if missing:
        raise CheckpointError(f"{path} has no adapter identity ({', '.join(missing)} missing); "
                              "export only checkpoints written by python -m train")
    if type(state.get("step")) is not int or not all(isinstance(identity[k], str)
                                                     for k in ("base_model", "adapter_type", "image_encoder")):
        raise CheckpointError(f"{path} has no integer step or a malformed identity; "
                              "export only checkpoints written by python -m train")
    return state


def read_weights(checkpoint: Path, name: str, state: dict) -> dict:
    """The ``adapter`` weights, or the ``ema`` shadow weights, of a checkpoint; else a one-line ``CheckpointError``."""
    import torch

    from train.checkpoint import READ_ERRORS, CheckpointError, read_state

    if not (checkpoint / f"{name}.json").is_file():
        raise CheckpointError(f"{checkpoint.name} has no {name}.json{_missing_hint(name, state)}")
    try:
        weights = read_state(checkpoint, name)
    except READ_ERRORS as err:
        raise CheckpointError(f"cannot read the {name} weights of {checkpoint}: "
                              f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if name == "ema":
        weights = weights.get("shadow") if isinstance(weights, dict) else None
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(f"{checkpoint.name}/{name}.json does not hold a mapping of weight names to tensors")
    return weights


def _missing_hint(name: str, state: dict) -> str:
    """Why a checkpoint lacks a state: EMA off, or the preemption that cut its second stage short."""
    if name != "ema":
        return ""
    if "ema" in (state.get("pending") or ()) or "ema" in (state.get("states") or ()):
        return " (the run was stopped before its EMA weights were written); drop --ema or export an earlier checkpoint"
    return " (trainer.ema was off); drop --ema"


def weights_path(out: Path) -> Path:
    """The weights file of ``--out``: FILE.safetensors itself, or DIR/ip-adapter.safetensors."""
    from train.record import EXPORT_NAME

    return out if out.suffix == ".safetensors" else out / EXPORT_NAME


def check_out(out: Path) -> None:
    """FILE.safetensors goes into an existing folder; DIR is made in an existing one (checked before loading).

    Only a regular file or a new name is replaced.
    """
    from instantstyle.errors import OutputPathError
    from instantstyle.safe_paths import check_output_dir, check_output_file
    from train.checkpoint import CheckpointError

    folder = weights_path(out).parent
    must_exist = folder if out.suffix == ".safetensors" else folder.parent
    if not must_exist.is_dir():
        raise CheckpointError(f"--out folder {must_exist} does not exist; create it first")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--out {folder} is a file; give a folder or a name ending in .safetensors")
    try:  # never a device (--out /dev/null), a symlink's target or a path under /proc
        check_output_dir(folder, "--out folder")
        if folder.is_dir():  # a folder still to be made holds nothing to replace
            check_output_file(weights_path(out), "--out")
    except OutputPathError as err:
        raise CheckpointError(str(err)) from None


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", ema: bool = False,
                      base: str | None = None, compact: bool = False) -> Path:
    """Rebuild the adapter on the base, load the checkpoint's (or EMA) weights and write the export folder.

    Returns the weights file.
    """
    from omegaconf import OmegaConf

    from train.builders import resolve_model_path
    from train.checkpoint import CheckpointError
    from train.families import export_adapter, share_info
    from train.record import model_ids, write_export_folder

    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    identity = state["identity"]
    if compact and identity.get("family") == "flux":
        raise CheckpointError("--compact is for SDXL and SD 1.5 adapters; FLUX files hold every block")
    weights = read_weights(checkpoint, "ema" if ema else "adapter", state)
    # A run records model.path as the user wrote it; model=toy's relative path means the packaged toy base.
    base_path = resolve_model_path(base or identity["base_model"], must_exist=False)
    family, model, adapter = rebuild_adapter(identity, weights, base_path, checkpoint.name)
    config = checkpoint / "config.yaml"
    cfg = OmegaConf.load(config) if config.is_file() else OmegaConf.create({})
    ids = model_ids(cfg, base_path, identity["image_encoder"])
    path = weights_path(Path(out))
    path.parent.mkdir(exist_ok=True)
    export_adapter(family, model, adapter, path, step=state["step"], dtype=dtype, ids=ids, compact=compact)
    share = share_info(family, model, adapter, weights_file=path.name, dtype=dtype, compact=compact)
    write_export_folder(path.parent, cfg, identity=identity, step=state["step"], share=share, ids=ids,
                        samples_seen=state.get("samples_seen"), run_dir=run_folder(checkpoint))
    return path


def run_folder(checkpoint: Path) -> Path | None:
    """RUN of RUN/checkpoints/checkpoint-N (its validation grids and metrics), or None elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def rebuild_adapter(identity: dict, weights: dict, base_path: str, name: str):
    """(family, UNet or meta FLUX transformer, adapter with the checkpoint's weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.models import model_family
    from train.checkpoint import CheckpointError

    if identity.get("family") == "flux":  # XLabs layout on the transformer's shape (train/flux_builders.py)
        from train.flux_builders import flux_adapter_from_checkpoint

        adapter, transformer = flux_adapter_from_checkpoint(identity, weights, base_path=base_path, name=name)
        return "flux", transformer, adapter
    def first_line(err: Exception) -> str:
        return (str(err).splitlines() or [type(err).__name__])[0]

    try:
        unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the base UNet from {base_path} ({first_line(err)}); pass --base PATH") from err
    try:
        spec = AdapterSpec.from_metadata(identity)
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise CheckpointError(f"{name}: unreadable adapter identity ({err})") from err
    try:
        adapter = install_adapter(unet, spec)
    except (ValueError, RuntimeError, TypeError, MemoryError) as err:
        raise CheckpointError(f"{name}: its adapter identity does not build on {base_path} ({first_line(err)})") from None
    try:
        adapter.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = str(err).splitlines()
        raise CheckpointError(f"{name} does not fit the base at {base_path}: "
                              f"{lines[1].strip() if len(lines) > 1 else err}") from err
    return model_family(unet), unet, adapter


def main(argv: list[str] | None = None) -> None:
    """CLI entry: user errors print one ``error: ...`` line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/checkpoint-00001000")
    parser.add_argument("--out", required=True, help="export folder, or FILE.safetensors (card and record go beside it)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="precision of the exported weights")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (needs trainer.ema)")
    parser.add_argument("--base", default=None, help="base model folder/id (default: the checkpoint's model.path)")
    parser.add_argument("--compact", action="store_true",
                        help="trained layers only (SDXL style: 120 instead of 670 MiB in fp16); loads in "
                             "InstantStyle, not in stock diffusers or ComfyUI")
    args = parser.parse_args(argv)
    quiet_libraries()
    from instantstyle.blocks import UnknownBlockError
    from instantstyle.errors import AdapterFileError
    from train.checkpoint import CheckpointError

    try:
        check_out(Path(args.out))
        path = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, ema=args.ema, base=args.base,
                                 compact=args.compact)
    except (CheckpointError, AdapterFileError, UnknownBlockError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
