"""Silence library notices that every run would print and that no user can act on.

Each filter drops records with one message fragment from one named logger (or one Python warning by
its message), so anything else these libraries say still shows. Entry points call `quiet_libraries`
before torch, diffusers or transformers load; the tests run a demo training with every optional extra
installed and fail on any warning line.
"""

from __future__ import annotations

import logging
import warnings

# logger name → message fragments dropped there
_ALWAYS = {
    # "`CLIPImageProcessor` requires torchvision … falling back to the PIL backend": we use neither backend's
    # transforms (the data pipeline resizes itself), and torchvision is not a dependency.
    "transformers.utils.import_utils": ("requires torchvision",),
    # diffusers imports bitsandbytes whenever it is installed; its CPU backend then looks for an optional kernels
    # package. Only optim=adamw8bit uses bitsandbytes, and that runs on GPUs.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # torchao registers enums in torch's pytree, which newer torch deprecates: between the two libraries' authors.
    "torch.utils._pytree": ("register_constant",),
}
# diffusers and transformers import torchao whenever it is installed: its GPU kernels cannot load on a CPU
# machine, and nothing quantized is loaded. A run with model.quantize set keeps these (they then matter).
_TORCHAO_UNUSED = {
    "torchao": ("Failed to load",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
# Python warnings, as (message regex, category). diffusers' load_config passes huggingface_hub an argument it
# has deprecated, so loading a base by hub id warned on every run.
_WARNINGS = (("The `local_dir_use_symlinks` argument is deprecated", UserWarning),)
_installed: set[str] = set()


def quiet_libraries(quantizing: bool = False) -> None:
    """Install the filters (once per logger); ``quantizing``: the run loads a torchao-quantized model."""
    notices = _ALWAYS if quantizing else {**_ALWAYS, **_TORCHAO_UNUSED}
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, fragments in notices.items():
        if name not in _installed:
            _installed.add(name)
            logging.getLogger(name).addFilter(_Drop(fragments))


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)
