"""The environment part of the GPU check: versions, the device, and which attention kernels actually run."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch
import torch.nn.functional as F

# SDXL's attention at 1024²: 10 heads of 64 over the 4096 tokens of the 64×64 latent's first level.
ATTENTION_SHAPE = (2, 10, 4096, 64)
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "triton", "bitsandbytes")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_report() -> dict:
    """Name, memory, compute capability and precision support of GPU 0 (or the CPU)."""
    if not torch.cuda.is_available():
        return {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpus": torch.cuda.device_count()}


def attention_kernels(smoke: bool) -> dict[str, str]:
    """Each scaled-dot-product attention backend run alone on SDXL-sized inputs: 'ok' or its error's first line."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available() and not smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = ATTENTION_SHAPE if cuda else (1, 2, 64, 32)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v)
            results[backend.name.lower()] = "ok"
        except RuntimeError as error:
            results[backend.name.lower()] = f"not available: {str(error).strip().splitlines()[0][:120]}"
    return results


def versions() -> dict[str, str]:
    """Installed versions (without importing: bitsandbytes prints warnings when imported)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def environment_report(smoke: bool) -> dict:
    """Everything the check's first line says, and more for the JSON file."""
    return {**device_report(), "torch": torch.__version__, "python": platform.python_version(),
            "packages": versions(), "attention_kernels": attention_kernels(smoke),
            "compile_backend_available": importlib.util.find_spec("triton") is not None}
