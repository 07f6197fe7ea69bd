"""A quantized frozen base (``model.quantize``): the denoiser's nn.Linear weights in int8, fp8 or NF4.

torchao does the quantization (the ``[quantize]`` extra). Its weights are tensor subclasses that a
plain ``nn.Linear`` call runs, on the CPU as on GPUs, with autograd reaching the layer's input, which
is what the adapter needs: its gradients flow back through the frozen, quantized layers after each
image branch. int8 and fp8 are weight-only (per-row scale, computed in the activation dtype); NF4 is
QLoRA's 4-bit NormalFloat with double-quantized block scales (64 weights per block). bitsandbytes
was not chosen: its 4- and 8-bit layers need its GPU backend (its CPU backend is partial), so the
tests here could not run them.

Only frozen weights are quantized, after loading and before the adapter is installed: the image
branches and the projection are created afterwards in fp32 and never quantized, and checkpoints and
exports hold adapter tensors only. SDXL's cross-attention ``to_k``/``to_v`` stay unquantized: each
image branch starts as a copy of them, and export writes them for the untrained layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

METHODS = ("none", "int8", "fp8", "nf4")
NF4_BLOCK = 64                # weights per NF4 block (QLoRA's)
NF4_SCALER_BLOCK = 256        # block scales per double-quantization block
INSTALL_HINT = "pip install 'instantstyle[quantize]' (torchao)"


class QuantizationError(ValueError):
    """A quantization this machine cannot run; the message is one line."""


def keeps_precision(name: str) -> bool:
    """Linear layers that stay unquantized: SDXL's text keys/values, which the image branches copy."""
    return name.endswith(("attn2.to_k", "attn2.to_v"))


def quantizable_linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every frozen nn.Linear that ``quantize_frozen`` quantizes."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and not child.weight.requires_grad and not keeps_precision(name):
            yield name, child


def _import_torchao(method: str):
    # torchao warns at import about CUDA-only kernels it cannot load here; none of them is used.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise QuantizationError(f"model.quantize={method} needs torchao: {INSTALL_HINT}, "
                                "or set model.quantize=none") from None
    return quantization


def require_quantization(method: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Refuse in one line a method that is unknown, not installed, or fails on this device and dtype."""
    if method not in METHODS:
        raise QuantizationError(f"model.quantize={method!r} — valid: {', '.join(METHODS)}")
    if method == "none":
        return
    _import_torchao(method)
    layer = nn.Linear(NF4_BLOCK, NF4_BLOCK, device=device, dtype=dtype).requires_grad_(False)
    probe = torch.ones(1, NF4_BLOCK, device=device, dtype=dtype, requires_grad=True)
    try:
        quantize_frozen(layer, method)
        layer(probe).sum().backward()
    except Exception as err:  # a backend or kernel missing on this machine: anything it raises means "cannot"
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise QuantizationError(f"model.quantize={method} does not run on {torch.device(device).type} "
                                f"in {dtype} here ({reason}); choose another method or none") from None


def quantize_frozen(module: nn.Module, method: str) -> int:
    """Quantize ``module``'s frozen nn.Linear weights in place; returns how many layers were quantized."""
    if method == "none":
        return 0
    quantization = _import_torchao(method)
    layers = list(quantizable_linears(module))
    if method == "nf4":
        for _, layer in layers:
            layer.weight = nn.Parameter(_to_nf4(quantization, layer.weight), requires_grad=False)
        return len(layers)
    config = {"int8": quantization.Int8WeightOnlyConfig, "fp8": quantization.Float8WeightOnlyConfig}[method]()
    chosen = {id(layer) for _, layer in layers}
    quantization.quantize_(module, config, filter_fn=lambda child, _name: id(child) in chosen)
    return len(layers)


def _to_nf4(quantization, weight: torch.Tensor) -> torch.Tensor:
    if weight.numel() % NF4_BLOCK:
        raise QuantizationError(f"model.quantize=nf4 needs layers whose size is a multiple of {NF4_BLOCK} "
                                f"(got a weight of shape {tuple(weight.shape)}); use int8")
    # Double quantization groups the block scales; small layers (the tiny test bases) get smaller groups.
    scaler_block = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
    return quantization.to_nf4(weight.detach(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores: a quantized tensor subclass by its inner tensors."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(storage_bytes(getattr(tensor, name)) for name in names)


def is_quantized(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a quantized tensor subclass."""
    return any(type(p) not in (torch.Tensor, nn.Parameter) and hasattr(p, "__tensor_flatten__")
               for p in module.parameters())
