"""Trainable parameters and optimizer memory of an InstantStyle adapter on the real architectures.

Builds the public SDXL (or SD 1.5) UNet and OpenCLIP image-encoder configs, or the
FLUX.1-dev transformer config, on the ``meta`` device: exact shapes, no weights, no download.
The counting lives in ``instantstyle.model_sizes`` (``python -m instantstyle.plan_memory`` uses it too).

    python -m benchmarks.bench_params [--model sdxl|sd15|flux]
"""

from __future__ import annotations

import argparse

from instantstyle.model_sizes import (BYTES_PER_PARAM, FLUX_CHOICES, count_flux_trainable, count_trainable,
                                      flux_frozen_bytes)

MODELS = ("sdxl", "sd15")


def _fmt(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


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
