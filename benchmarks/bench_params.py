"""Trainable parameters and optimizer memory of an InstantStyle adapter on the real architectures.

Builds the public SDXL (or SD 1.5) UNet and OpenCLIP image-encoder configs, or the
FLUX.1-dev transformer config, on the ``meta`` device: exact shapes, no weights, no download.

    python -m benchmarks.bench_params [--model sdxl|sd15|flux]
"""

from __future__ import annotations

import argparse

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.blocks import preset_blocks
from instantstyle.flux import FluxAdapterSpec, install_flux_adapter
from instantstyle.reference_configs import build_flux_transformer, build_image_encoder, build_unet

MODELS = {"sdxl": ("sdxl_unet", "openclip_bigg_vision"), "sd15": ("sd15_unet", "openclip_vith_vision")}
# FLUX block choices: one double block, every double block, and every block. The last is
# hypothetical: diffusers' FLUX IP-Adapter format has branches on double blocks only.
FLUX_CHOICES = ("one_double", "all_double", "all_blocks")
# Bytes per trainable parameter: fp32 weight + fp32 grad + optimizer states.
BYTES_PER_PARAM = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}


def count_trainable(model: str, preset: str, adapter_type: str) -> dict[str, int]:
    """Parameter counts of the projection and of the image branches for one preset."""
    unet_name, encoder_name = MODELS[model]
    unet = build_unet(unet_name)
    encoder = build_image_encoder(encoder_name).config
    plus = adapter_type == "ip_adapter_plus"
    spec = AdapterSpec(adapter_type, _blocks(preset, model),
                       encoder.hidden_size if plus else encoder.projection_dim, 16 if plus else 4)
    adapter = install_adapter(unet, spec)
    projection = sum(p.numel() for p in adapter.image_proj.parameters())
    branches = sum(p.numel() for p in adapter.layers.parameters())
    return {"layers": len(adapter.layer_names), "projection": projection, "branches": branches,
            "total": projection + branches}


def _blocks(preset: str, model: str):
    return tuple(preset_blocks(preset, model))


def _fmt(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def count_flux_trainable(choice: str) -> dict[str, int]:
    """Parameter counts of a FLUX.1-dev IP-Adapter (CLIP ViT-L/14 embeddings, 4 tokens) per block choice."""
    transformer = build_flux_transformer()
    config = transformer.config
    adapter = install_flux_adapter(transformer, FluxAdapterSpec(double_blocks=None))
    per_block = sum(p.numel() for p in adapter.layers[0].parameters())
    # Single-stream blocks have the same width, so a branch there would cost the same.
    layers = {"one_double": 1, "all_double": config.num_layers,
              "all_blocks": config.num_layers + config.num_single_layers}[choice]
    projection = sum(p.numel() for p in adapter.image_proj.parameters())
    return {"layers": layers, "projection": projection, "branches": layers * per_block,
            "total": projection + layers * per_block}


def flux_frozen_bytes(dtype_bytes: int = 2) -> int:
    """Size of the frozen FLUX.1-dev transformer's weights (bf16 by default)."""
    return sum(p.numel() for p in build_flux_transformer().parameters()) * dtype_bytes


def _print_row(label: str, kind: str, c: dict[str, int]) -> None:
    gib = {k: c["total"] * v / 2**30 for k, v in BYTES_PER_PARAM.items()}
    print(f"| {label} | {kind} | {c['layers']} | {_fmt(c['branches'])} | {_fmt(c['projection'])} "
          f"| {_fmt(c['total'])} | {gib['adamw']:.2f} GiB | {gib['adamw8bit']:.2f} GiB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted([*MODELS, "flux"]), default="sdxl")
    args = parser.parse_args(argv)
    print("| blocks | projection | layers | image-branch params | projection params | trainable | "
          "AdamW state+grad+weights | AdamW8bit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    if args.model == "flux":
        for choice in FLUX_CHOICES:
            _print_row(choice, "ip_adapter", count_flux_trainable(choice))
        print(f"\nfrozen FLUX.1-dev transformer, bf16: {flux_frozen_bytes() / 2**30:.2f} GiB; "
              f"all_blocks is hypothetical (stock diffusers loads double-block branches only)")
        return
    for adapter_type in ("ip_adapter", "ip_adapter_plus"):
        for preset in ("style", "style_layout", "all"):
            _print_row(preset, adapter_type, count_trainable(args.model, preset, adapter_type))


if __name__ == "__main__":
    main()
