"""Export FLUX style adapters in the XLabs layout that stock ``FluxPipeline.load_ip_adapter`` reads.

Keys (safetensors)::

    ip_adapter_proj_model.proj.{weight,bias}, ip_adapter_proj_model.norm.{weight,bias}
    double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}

for EVERY double-stream block ``i``: the stock loader builds a branch on each one and
reads its weights by position. Blocks outside the trained set get all-zero ``k`` and
``v`` weights and biases: attention over zero values is exactly zero, so they add
nothing at any scale. Header metadata records
what the adapter is, so loading it back needs no extra arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

from .export import DTYPES, AdapterFileError, provenance, write_adapter_file
from .flux import FluxAdapterSpec, FluxStyleAdapter, install_flux_adapter

FORMAT = "instantstyle-flux-ip-adapter"
PROJ_PREFIX = "ip_adapter_proj_model."


def branch_key(index: int, part: str) -> str:
    """XLabs key prefix of double block ``index``'s ``part`` ('k' or 'v') projection."""
    return f"double_blocks.{index}.processor.ip_adapter_double_stream_{part}_proj"


def export_flux_tensors(adapter: FluxStyleAdapter, transformer: FluxTransformer2DModel,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full state dict: trained branches on the chosen blocks, inert placeholders elsewhere."""
    tensors = {PROJ_PREFIX + k: v for k, v in adapter.image_proj.state_dict().items()}
    trained = dict(zip(adapter.block_indices, adapter.layers))
    shape = (transformer.inner_dim, transformer.config.joint_attention_dim)
    for index in range(transformer.config.num_layers):
        if index in trained:
            k_proj, v_proj = trained[index].to_k_ip, trained[index].to_v_ip
            parts = {"k": (k_proj.weight, k_proj.bias), "v": (v_proj.weight, v_proj.bias)}
        else:
            # Separate tensors: safetensors refuses to save two keys sharing one storage.
            parts = {part: (torch.zeros(shape), torch.zeros(shape[0])) for part in ("k", "v")}
        for part, (weight, bias) in parts.items():
            tensors[f"{branch_key(index, part)}.weight"] = weight
            tensors[f"{branch_key(index, part)}.bias"] = bias
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}


def build_flux_metadata(adapter: FluxStyleAdapter, transformer: FluxTransformer2DModel, *,
                        base_model: str = "", image_encoder: str = "", step: int = 0) -> dict[str, str]:
    """String metadata stored in the safetensors header."""
    spec = adapter.spec
    return {
        "format": FORMAT,
        "adapter_type": "ip_adapter",
        "double_blocks": json.dumps(list(spec.double_blocks) if spec.double_blocks is not None else "all"),
        "num_tokens": str(spec.num_tokens),
        "image_embed_dim": str(spec.image_embed_dim),
        "joint_attention_dim": str(transformer.config.joint_attention_dim),
        "num_double_blocks": str(transformer.config.num_layers),
        **provenance(spec.extra, base_model=base_model, image_encoder=image_encoder, step=step),
    }


def export_flux_safetensors(adapter: FluxStyleAdapter, transformer: FluxTransformer2DModel, path: str | Path, *,
                            dtype: str | torch.dtype = torch.float32, base_model: str = "",
                            image_encoder: str = "", step: int = 0) -> Path:
    """Write ``path`` atomically (temporary file, then rename) in the XLabs layout."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    metadata = build_flux_metadata(adapter, transformer, base_model=base_model, image_encoder=image_encoder,
                                   step=step)
    return write_adapter_file(export_flux_tensors(adapter, transformer, dtype), metadata, path)


def read_flux_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of an XLabs-layout safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"unsupported FLUX adapter file type {path.suffix!r}: use .safetensors")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def is_flux_adapter_file(path: str | Path) -> bool:
    """True for a .safetensors file in the XLabs FLUX layout (reads the header only)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return any(k.startswith(PROJ_PREFIX) for k in f.keys())


def flux_spec_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FluxAdapterSpec:
    """The spec from metadata; public files (no metadata) count as trained on every double block."""
    weight = tensors.get(PROJ_PREFIX + "proj.weight")
    if weight is None:
        raise AdapterFileError(f"not a FLUX IP-Adapter file: no {PROJ_PREFIX}proj.weight")
    try:
        num_tokens = weight.shape[0] // tensors[PROJ_PREFIX + "norm.weight"].shape[0]
        blocks = json.loads(metadata.get("double_blocks", '"all"'))
    except (KeyError, IndexError, ZeroDivisionError, ValueError, RecursionError) as err:
        raise AdapterFileError(f"not a FLUX IP-Adapter layout ({type(err).__name__})") from None
    if blocks != "all" and not (isinstance(blocks, list)
                                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)):
        raise AdapterFileError('metadata field double_blocks must be a JSON list of block indices or "all"')
    extra = {k: metadata[k] for k in ("base_model", "image_encoder", "step") if k in metadata}
    return FluxAdapterSpec(None if blocks == "all" else tuple(blocks), int(weight.shape[1]), int(num_tokens), extra)


def check_flux_shapes(tensors: dict[str, torch.Tensor], transformer: FluxTransformer2DModel, path: Path) -> None:
    """One-line error for a file made for another FLUX layout."""
    config = transformer.config
    file_blocks = len({k.split(".")[1] for k in tensors if k.startswith("double_blocks.")})
    if file_blocks != config.num_layers:
        raise AdapterFileError(f"{path.name} does not fit this base model: it has {file_blocks} double blocks, "
                               f"the base model has {config.num_layers}")
    want = (transformer.inner_dim, config.joint_attention_dim)
    for key in (f"{branch_key(0, part)}.weight" for part in ("k", "v")):
        if tuple(tensors[key].shape) != want:
            raise AdapterFileError(f"{path.name} does not fit this base model: {key} has shape "
                                   f"{tuple(tensors[key].shape)}, the base model needs {want}")


def load_flux_adapter(path: str | Path, transformer: FluxTransformer2DModel) -> FluxStyleAdapter:
    """Install the adapter saved at ``path`` on ``transformer`` (our export or an XLabs file)."""
    path = Path(path)
    tensors, metadata = read_flux_file(path)
    check_flux_shapes(tensors, transformer, path)
    adapter = install_flux_adapter(transformer, flux_spec_from_file(tensors, metadata))
    copy_flux_weights(adapter, tensors)
    return adapter


def copy_flux_weights(adapter: FluxStyleAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the projection and the adapter's own blocks' branches from XLabs-layout ``tensors``.

    Blocks the adapter has no branch on are not read: fine-tuning from an all-block file
    (XLabs' public adapter) keeps only the chosen blocks' branches.
    """
    adapter.image_proj.load_state_dict({k.removeprefix(PROJ_PREFIX): v for k, v in tensors.items()
                                        if k.startswith(PROJ_PREFIX)})
    with torch.no_grad():
        for index, proc in zip(adapter.block_indices, adapter.layers):
            for part, linear in (("k", proc.to_k_ip), ("v", proc.to_v_ip)):
                linear.weight.copy_(tensors[f"{branch_key(index, part)}.weight"])
                linear.bias.copy_(tensors[f"{branch_key(index, part)}.bias"])
