"""Export a training checkpoint in the ``ip-adapter.safetensors`` format stock diffusers loads.

    python -m train.export RUN/checkpoints/checkpoint-00001000 --out FILE [--dtype fp16] [--ema] [--base PATH]

Only the base UNet is loaded (from the checkpoint's ``model.path`` unless ``--base``): inert
layers need its ``to_k`` weights. Wrong base or block set: one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.blocks import UnknownBlockError
from instantstyle.export import DTYPES, AdapterFileError, export_safetensors
from train.checkpoint import STATE_FILE, CheckpointError, read_state


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", ema: bool = False,
                      base: str | None = None) -> Path:
    """Rebuild the adapter on the base UNet, load the checkpoint's (or EMA) weights and export."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE_FILE).is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    identity = state["identity"]
    base_path = base or identity["base_model"]
    try:
        unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the base UNet from {base_path} ({str(err).splitlines()[0]}); "
                              "pass --base PATH") from err
    adapter = install_adapter(unet, AdapterSpec.from_metadata(identity))
    weights = read_state(checkpoint, "adapter")
    if ema:
        if not (checkpoint / "ema.json").is_file():
            raise CheckpointError(f"{checkpoint.name} has no EMA weights (trainer.ema was off); drop --ema")
        weights = read_state(checkpoint, "ema")["shadow"]
    try:
        adapter.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint.name} does not fit the base at {base_path}: "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from err
    return export_safetensors(adapter, unet, out, dtype=dtype, base_model=identity["base_model"],
                              image_encoder=identity["image_encoder"], step=int(state["step"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/checkpoint-00001000")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (needs trainer.ema)")
    parser.add_argument("--base", default=None, help="base model folder/id (default: the checkpoint's model.path)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, ema=args.ema, base=args.base)
    except (CheckpointError, AdapterFileError, UnknownBlockError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {path}")


if __name__ == "__main__":
    main()
