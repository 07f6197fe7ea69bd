"""The few places where training differs by base family (SDXL/SD 1.5 UNet vs FLUX transformer), one function each.

``build_run``, ``export_final`` and the config check call these. The two config groups whose builders
differ by family choose at their own entry (``train.builders.build_adapter``, ``train.checks.target_blocks``);
everything else (loop, optimizer, EMA, checkpoints, data) is shared.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from train.checks import Settings


def denoiser(base) -> nn.Module:
    """The network the adapter lives in: the UNet, or FLUX's transformer."""
    return base.transformer if base.family == "flux" else base.unet


def adapted_model(base, adapter: nn.Module) -> nn.Module:
    """Denoiser + adapter as one module for ``accelerator.prepare`` (DDP sees the adapter weights)."""
    if base.family == "flux":
        from train.flux_task import AdaptedFluxTransformer

        return AdaptedFluxTransformer(base.transformer, adapter)
    from train.task import AdaptedUNet

    return AdaptedUNet(base.unet, adapter)


def task_for(base, model: nn.Module, adapter: nn.Module, generator: torch.Generator, settings: Settings):
    """The training task: ``DiffusionTask`` (noise prediction) or ``FluxTask`` (rectified flow)."""
    trainer, data = settings.trainer, settings.data
    if base.family == "flux":
        from train.flux_task import FluxTask

        return FluxTask(base, model, generator=generator, clip_mean=data.clip_mean, clip_std=data.clip_std)
    from train.task import DiffusionTask

    return DiffusionTask(base, model, adapter_type=adapter.spec.adapter_type, generator=generator,
                         noise_offset=trainer.noise_offset, snr_gamma=trainer.snr_gamma,
                         content_scale=trainer.content_scale, content_normalize=trainer.content_normalize,
                         clip_mean=data.clip_mean, clip_std=data.clip_std)


def adapter_identity(base, adapter: nn.Module) -> dict[str, str]:
    """The checkpoint identity of the adapter (what a resume or an export must match)."""
    if base.family == "flux":
        from train.flux_builders import flux_identity

        return flux_identity(adapter)
    return adapter.spec.to_metadata()


def export_adapter(family: str, model: nn.Module, adapter: nn.Module, path: Path, *, step: int,
                   dtype: str = "fp32", ids: tuple[str, str] = ("", ""), compact: bool = False) -> Path:
    """Write the adapter in the format stock diffusers loads for this family (``model`` = its denoiser).

    ``ids`` = (base, image encoder) as the file records them; ``compact`` = trained layers only (UNet bases).
    """
    if family == "flux":
        from instantstyle.flux_export import export_flux_safetensors

        return export_flux_safetensors(adapter, model, path, dtype=dtype, step=step, base_model=ids[0],
                                       image_encoder=ids[1])
    from instantstyle.export import export_safetensors

    return export_safetensors(adapter, model, path, dtype=dtype, step=step, base_model=ids[0], image_encoder=ids[1],
                              compact=compact)


def share_info(family: str, model: nn.Module, adapter: nn.Module, *, weights_file: str, dtype: str,
               compact: bool = False) -> dict:
    """What the model card needs from the live model: family, layer counts, diffusers/ComfyUI usage."""
    info = {"family": family, "weights_file": weights_file, "dtype": dtype, "layout": "compact" if compact else "full"}
    if family == "flux":
        return {**info, "trained_layers": len(adapter.block_indices),
                "all_layers": model.config.num_layers, "usage": {}}
    from instantstyle.model_card import usage_for_unet

    return {**info, "trained_layers": len(adapter.layer_names), "all_layers": len(adapter.all_layer_names),
            "usage": usage_for_unet(model, adapter.spec)}
