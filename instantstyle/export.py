"""Export to, and import from, the IP-Adapter safetensors format that stock diffusers loads.

Keys: ``image_proj.*`` and ``ip_adapter.{id}.to_k_ip.weight`` / ``.to_v_ip.weight`` for
EVERY cross-attention layer, ``id`` = 1, 3, 5, ... in ``unet.attn_processors`` order
(diffusers' ``load_ip_adapter`` needs all of them). Layers outside the trained blocks get
``to_k_ip`` as initialised (a copy of ``to_k``) and an all-zero ``to_v_ip``: attention
over zero values is zero, so they add nothing at any scale. Header metadata records
what the adapter is, so loading needs no extra arguments.
"""

from __future__ import annotations

import json
import logging
import pickle  # only for its error type: nothing is ever unpickled
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save

from . import __version__
from .adapter import AdapterSpec, InstantStyleAdapter, attention_module, blocks_from_metadata, install_adapter
from .blocks import cross_attention_layers, export_id, select_layers
from .errors import AdapterFileError, OutputPathError
from .model_ids import portable_id
from .projection import build_image_projection
from .safe_paths import make_output_dir, write_atomic

log = logging.getLogger(__name__)
FORMAT = "instantstyle-ip-adapter"
COMPACT = "compact"  # metadata ``layout`` of a file holding only the trained layers
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Metadata fields that hold whole numbers (all metadata values are strings).
# Trained IP-Adapter weights are of order 1; a weight past this came from a diverged run and renders black.
EXPLODED_WEIGHT = 1e6
INTEGER_FIELDS = ("num_tokens", "image_embed_dim", "resampler_dim", "cross_attention_dim",
                  "num_cross_attention_layers", "step")


def export_tensors(adapter: InstantStyleAdapter, unet: UNet2DConditionModel,
                   dtype: torch.dtype = torch.float32, compact: bool = False) -> dict[str, torch.Tensor]:
    """The full IP-Adapter state dict: trained target layers, inert placeholders elsewhere (none if ``compact``)."""
    tensors = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    trained = dict(zip(adapter.layer_names, adapter.layers))
    for i, name in enumerate(adapter.all_layer_names):
        key = f"ip_adapter.{export_id(i)}"
        if name in trained:
            to_k, to_v = trained[name].to_k_ip.weight, trained[name].to_v_ip.weight
        elif compact:
            continue
        else:
            to_k = attention_module(unet, name).to_k.weight
            to_v = torch.zeros_like(to_k)
        tensors[f"{key}.to_k_ip.weight"], tensors[f"{key}.to_v_ip.weight"] = to_k, to_v
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}


def complete_layers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], unet: UNet2DConditionModel,
                    path: str | Path) -> dict[str, torch.Tensor]:
    """A compact file's tensors with the inert placeholders put back, as in a full export; others unchanged.

    The placeholders come from the base (``to_k``) and zeros, so a compact file loads wherever a full one does.
    """
    if metadata.get("layout") != COMPACT:
        return tensors
    names = cross_attention_layers(unet.attn_processors)
    if metadata.get("num_cross_attention_layers") != str(len(names)):
        raise AdapterFileError(f"{Path(path).name} does not fit this base model: it was made for "
                               f"{metadata.get('num_cross_attention_layers')} cross-attention layers, "
                               f"the base model has {len(names)}")
    dtype = next(iter(tensors.values())).dtype
    full = dict(tensors)
    for i, name in enumerate(names):
        key = f"ip_adapter.{export_id(i)}"
        if f"{key}.to_k_ip.weight" not in full:
            to_k = attention_module(unet, name).to_k.weight.detach()
            full[f"{key}.to_k_ip.weight"] = to_k.to(dtype).clone()
            full[f"{key}.to_v_ip.weight"] = torch.zeros(to_k.shape, dtype=dtype, device=to_k.device)
    return full


def build_metadata(adapter: InstantStyleAdapter, unet: UNet2DConditionModel, *, base_model: str = "",
                   image_encoder: str = "", step: int = 0, compact: bool = False) -> dict[str, str]:
    """String metadata stored in the safetensors header."""
    spec = adapter.spec
    return {
        **spec.to_metadata(),
        "format": FORMAT,
        "cross_attention_dim": str(unet.config.cross_attention_dim),
        "num_cross_attention_layers": str(len(adapter.all_layer_names)),
        **({"layout": COMPACT} if compact else {}),
        **provenance(spec.extra, base_model=base_model, image_encoder=image_encoder, step=step),
    }


def provenance(extra: Mapping[str, str], *, base_model: str, image_encoder: str, step: int) -> dict[str, str]:
    """Where an adapter comes from, for any base family's file header: base, image encoder, step, version.

    Bases and encoders are recorded as ``model_ids.portable_id`` gives them: never a local folder's path.
    """
    return {"base_model": portable_id(base_model or str(extra.get("base_model", ""))),
            "image_encoder": portable_id(image_encoder or str(extra.get("image_encoder", ""))),
            "step": str(step), "framework_version": __version__}


def export_safetensors(adapter: InstantStyleAdapter, unet: UNet2DConditionModel, path: str | Path, *,
                       dtype: str | torch.dtype = torch.float32, base_model: str = "",
                       image_encoder: str = "", step: int = 0, compact: bool = False) -> Path:
    """Write ``path`` atomically (temporary file, then rename) in the documented format.

    ``compact``: the trained layers only; our loaders complete it from the base, stock loaders cannot.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    metadata = build_metadata(adapter, unet, base_model=base_model, image_encoder=image_encoder, step=step,
                              compact=compact)
    return write_adapter_file(export_tensors(adapter, unet, dtype, compact), metadata, path)


def write_adapter_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> Path:
    """Write a safetensors file byte-deterministically and atomically (``safe_paths.write_atomic``).

    Non-finite weights are refused: they load, then generate black or noise without a word.
    """
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(f"cannot export to {path}: it is a folder, give a file name")
    check_tensors(tensors, path, writing=True)
    try:
        make_output_dir(path.parent, "export folder")
        return write_atomic(path, canonical_safetensors(save(tensors, metadata=metadata)), "export")
    except OutputPathError as err:
        raise AdapterFileError(str(err)) from None


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors bytes with the metadata sorted, so equal weights give equal files.

    safetensors keeps metadata in a Rust HashMap, whose order changes from call to call.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # tensor data must start 8-byte aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat ``image_proj.*``/``ip_adapter.*`` tensors and header metadata ({} for .bin files)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif path.suffix in (".bin", ".pt", ".pth"):
        tensors, metadata = _read_legacy(path), {}
    else:
        raise AdapterFileError(f"unsupported adapter file type {path.suffix!r}: use .safetensors or .bin")
    check_tensors(tensors, path)
    largest = largest_weight(tensors)
    if largest > EXPLODED_WEIGHT:
        log.warning("%s: a weight reaches %.3g (> %g): it comes from a diverged training run and will render "
                    "black or noise; export an earlier checkpoint", path, largest, EXPLODED_WEIGHT)
    return tensors, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt or truncated files
        raise AdapterFileError(f"cannot read adapter file {path}: {str(err).splitlines()[0]}") from err


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    # Legacy IP-Adapter checkpoints: tensors only, never arbitrary objects.
    try:
        nested = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never here
        raise AdapterFileError(f"cannot read adapter file {path}: it is not a tensors-only checkpoint (pickled "
                               "objects are never loaded); convert it to .safetensors") from None
    except Exception as err:  # torch.load raises many types for files it cannot or must not read
        raise AdapterFileError(f"cannot read adapter file {path}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(nested, dict) or "image_proj" not in nested or "ip_adapter" not in nested:
        raise AdapterFileError(f"{path} is not an IP-Adapter checkpoint (no image_proj/ip_adapter)")
    flat = {}
    for group in ("image_proj", "ip_adapter"):
        if not isinstance(nested[group], dict):
            raise AdapterFileError(f"{path}: {group} is a {type(nested[group]).__name__}, not a dict of tensors")
        for key, value in nested[group].items():
            if not isinstance(value, torch.Tensor):
                raise AdapterFileError(f"{path}: {group}.{key} is a {type(value).__name__}, not a tensor")
            flat[f"{group}.{key}"] = value
    return flat


def check_tensors(tensors: dict[str, torch.Tensor], path: Path, writing: bool = False) -> None:
    """Refuse integer or non-finite weights (and, when writing, exploded ones): they generate garbage silently."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterFileError(f"{path}: {key} holds {value.dtype} values; adapter weights must be floating point")
        if not torch.isfinite(value).all():
            if writing:
                raise AdapterFileError(f"refusing to write {path}: {key} holds NaN or inf values (the training "
                                       "diverged; export an earlier checkpoint)")
            raise AdapterFileError(f"{path}: {key} contains NaN or inf values; export the adapter again")
    largest = largest_weight(tensors)
    if writing and largest > EXPLODED_WEIGHT:
        raise AdapterFileError(f"refusing to write {path}: a weight reaches {largest:.3g} (> {EXPLODED_WEIGHT:g}: "
                               "the training diverged; export an earlier checkpoint)")


def largest_weight(tensors: dict[str, torch.Tensor]) -> float:
    """The largest absolute value among floating-point ``tensors`` (0 for none)."""
    return max((float(v.detach().abs().max()) for v in tensors.values() if v.is_floating_point() and v.numel()),
               default=0.0)


def check_metadata(metadata: dict[str, str], path: str | Path) -> None:
    """One-line error naming the file and the first metadata field that cannot be parsed."""
    for key in INTEGER_FIELDS:
        if key in metadata and not str(metadata[key]).strip().lstrip("-").isdigit():
            raise AdapterFileError(f"{path}: metadata field {key} is {metadata[key]!r}, not a whole number")
    if "target_blocks" in metadata:
        try:
            blocks = json.loads(metadata["target_blocks"])
        except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
            blocks = None
        if blocks != "all" and not (isinstance(blocks, list) and all(isinstance(b, str) and b for b in blocks)):
            shown = metadata["target_blocks"]
            shown = repr(shown if len(shown) <= 80 else shown[:80] + "…")
            raise AdapterFileError(f"{path}: metadata field target_blocks is {shown}; "
                                   'expected a JSON list of block names or "all"')


def spec_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   cross_attention_dim: int, path: str | Path = "adapter file") -> AdapterSpec:
    """Recover the adapter spec from metadata, or from tensor shapes for public files (one line when they don't fit)."""
    check_metadata(metadata, path)
    try:
        return _spec_from_file(tensors, metadata, cross_attention_dim)
    except AdapterFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as err:
        raise AdapterFileError(f"{path}: not an IP-Adapter layout this base reads "
                               f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None


def _spec_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    cross_attention_dim: int) -> AdapterSpec:
    if "image_proj.latents" in tensors:
        latents = tensors["image_proj.latents"]
        adapter_type, num_tokens, resampler_dim = "ip_adapter_plus", latents.shape[1], latents.shape[2]
        image_embed_dim = tensors["image_proj.proj_in.weight"].shape[1]
    elif "image_proj.proj.weight" in tensors:
        weight = tensors["image_proj.proj.weight"]
        adapter_type, resampler_dim = "ip_adapter", int(metadata.get("resampler_dim", 1280))
        num_tokens, image_embed_dim = weight.shape[0] // cross_attention_dim, weight.shape[1]
    else:
        raise AdapterFileError("unsupported image projection: expected image_proj.proj.* or image_proj.latents")
    # Public files have no metadata: they were trained with an image branch on every layer.
    blocks = blocks_from_metadata(metadata.get("target_blocks"))
    extra = {k: metadata[k] for k in ("base_model", "image_encoder", "step") if k in metadata}
    return AdapterSpec(adapter_type, blocks, int(image_embed_dim), int(num_tokens), int(resampler_dim), extra)


def expected_shapes(unet: UNet2DConditionModel, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every key the file must hold for this base model and spec (targets only)."""
    with torch.device("meta"):
        proj = build_image_projection(spec.adapter_type, image_embed_dim=spec.image_embed_dim,
                                      cross_attention_dim=unet.config.cross_attention_dim,
                                      num_tokens=spec.num_tokens, resampler_dim=spec.resampler_dim)
    shapes = {f"image_proj.{k}": tuple(v.shape) for k, v in proj.state_dict().items()}
    names = list(unet.attn_processors.keys())
    targets = set(select_layers(names, spec.blocks))
    for i, name in enumerate(cross_attention_layers(names)):
        if name in targets:
            shape = tuple(attention_module(unet, name).to_k.weight.shape)
            for part in ("to_k_ip", "to_v_ip"):
                shapes[f"ip_adapter.{export_id(i)}.{part}.weight"] = shape
    return shapes


def check_shapes(tensors: dict[str, torch.Tensor], unet: UNet2DConditionModel, spec: AdapterSpec,
                 path: Path) -> None:
    """One-line error for a file keyed for another layer count, or naming the first misfit key."""
    num_layers = len(cross_attention_layers(unet.attn_processors))
    file_layers = len({k.split(".")[1] for k in tensors if k.startswith("ip_adapter.")})
    if file_layers != num_layers:
        # Ids are positions over ALL cross-attention layers: another count means another UNet layout.
        raise AdapterFileError(f"{path.name} does not fit this base model: it has {file_layers} "
                               f"cross-attention layers, the base model has {num_layers}")
    for key, shape in expected_shapes(unet, spec).items():
        if key not in tensors:
            raise AdapterFileError(f"{path.name} does not fit this base model: key {key} is missing")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(f"{path.name} does not fit this base model: {key} has shape "
                                   f"{tuple(tensors[key].shape)}, the base model needs {shape}")


def load_adapter(path: str | Path, unet: UNet2DConditionModel,
                 blocks: Sequence[str] | None = None) -> InstantStyleAdapter:
    """Install an adapter on ``unet`` from our export or a public IP-Adapter file.

    ``blocks`` (block prefixes) overrides the target blocks; ``None`` = the file's own, from its
    metadata (public files have none and are treated as trained on all layers).
    """
    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    tensors = complete_layers(tensors, metadata, unet, path)
    spec = spec_from_file(tensors, metadata, unet.config.cross_attention_dim, path)
    if blocks is not None:
        spec = AdapterSpec(spec.adapter_type, tuple(blocks), spec.image_embed_dim, spec.num_tokens,
                           spec.resampler_dim, spec.extra)
    check_shapes(tensors, unet, spec, path)
    adapter = install_adapter(unet, spec)
    state = {k.removeprefix("image_proj."): v for k, v in tensors.items() if k.startswith("image_proj.")}
    adapter.image_proj.load_state_dict(state)
    with torch.no_grad():
        for proc, key_id in zip(adapter.layers, adapter.export_ids()):
            proc.to_k_ip.weight.copy_(tensors[f"ip_adapter.{key_id}.to_k_ip.weight"])
            proc.to_v_ip.weight.copy_(tensors[f"ip_adapter.{key_id}.to_v_ip.weight"])
    return adapter
