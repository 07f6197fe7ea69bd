"""Export a training checkpoint in the ``ip-adapter.safetensors`` format stock diffusers loads.

    python -m train.export RUN/checkpoints/checkpoint-00001000 --out FILE [--dtype fp16] [--ema] [--base PATH]

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from err
    identity = state.get("identity") if isinstance(state, dict) else None
    missing = [k for k in IDENTITY_KEYS if not isinstance(identity, dict) or k not in identity]
    if missing:
        raise CheckpointError(f"{path} has no adapter identity ({', '.join(missing)} missing); "
                              "export only checkpoints written by python -m train")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} has no integer step")
    return state


def read_weights(checkpoint: Path, name: str) -> dict:
    """The ``adapter`` or ``ema`` state of a checkpoint, or a one-line ``CheckpointError``."""
    from safetensors import SafetensorError

    from train.checkpoint import CheckpointError, read_state

    if not (checkpoint / f"{name}.json").is_file():
        hint = " (trainer.ema was off); drop --ema" if name == "ema" else ""
        raise CheckpointError(f"{checkpoint.name} has no {name}.json{hint}")
    try:
        return read_state(checkpoint, name)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"cannot read the {name} weights of {checkpoint}: {str(err).splitlines()[0]}") from err


def check_out(out: Path) -> None:
    """The export goes to a file name in an existing folder (checked before anything is loaded)."""
    from train.checkpoint import CheckpointError

    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder; give a file name such as {out / 'ip-adapter.safetensors'}")
    if not out.parent.is_dir():
        raise CheckpointError(f"--out folder {out.parent} does not exist; create it first")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", ema: bool = False,
                      base: str | None = None) -> Path:
    """Rebuild the adapter on the base UNet, load the checkpoint's (or EMA) weights and export."""
    import torch
    from diffusers import UNet2DConditionModel

    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.export import export_safetensors
    from train.builders import resolve_model_path
    from train.checkpoint import CheckpointError

    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    identity = state["identity"]
    weights = read_weights(checkpoint, "ema" if ema else "adapter")
    if ema:
        weights = weights.get("shadow") if isinstance(weights, dict) else None
        if weights is None:
            raise CheckpointError(f"{checkpoint.name}/ema.json has no shadow weights")
    # A run records model.path as the user wrote it; model=toy's relative path means the packaged toy base.
    base_path = resolve_model_path(base or identity["base_model"], must_exist=False)
    if identity.get("family") == "flux":  # XLabs layout on the transformer's shape (train/flux_builders.py)
        from train.flux_builders import export_flux_checkpoint

        return export_flux_checkpoint(identity, weights, out, dtype=dtype, base_path=base_path, step=state["step"],
                                      name=checkpoint.name)
    try:
        unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the base UNet from {base_path} ({str(err).splitlines()[0]}); "
                              "pass --base PATH") from err
    try:
        spec = AdapterSpec.from_metadata(identity)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.name}: unreadable adapter identity ({err})") from err
    adapter = install_adapter(unet, spec)
    try:
        adapter.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint.name} does not fit the base at {base_path}: "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from err
    return export_safetensors(adapter, unet, out, dtype=dtype, base_model=identity["base_model"],
                              image_encoder=identity["image_encoder"], step=state["step"])


def main(argv: list[str] | None = None) -> None:
    """CLI entry: user errors print one ``error: ...`` line and exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/checkpoint-00001000")
    parser.add_argument("--out", required=True, help="output .safetensors file (its folder must exist)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="precision of the exported weights")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (needs trainer.ema)")
    parser.add_argument("--base", default=None, help="base model folder/id (default: the checkpoint's model.path)")
    args = parser.parse_args(argv)
    from instantstyle.blocks import UnknownBlockError
    from instantstyle.errors import AdapterFileError
    from train.checkpoint import CheckpointError

    try:
        check_out(Path(args.out))
        path = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, ema=args.ema, base=args.base)
    except (CheckpointError, AdapterFileError, UnknownBlockError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
