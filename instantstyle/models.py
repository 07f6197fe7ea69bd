"""Loading the frozen base: UNet, VAE, text encoders, tokenizers, image encoder and scheduler.

Real models (SDXL base, OpenCLIP bigG) and the tiny test model go through the same
``from_pretrained`` calls; only the path differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .content import check_content_space
from .encode import to_device


class BaseModelError(ValueError):
    """A base model folder or id that cannot be used."""


@dataclass
class BaseModel:
    """Frozen components of a Stable Diffusion base plus its IP-Adapter image encoder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer_2: CLIPTokenizer | None
    image_encoder: CLIPVisionModelWithProjection
    noise_scheduler: DDPMScheduler
    family: str  # "sdxl" or "sd15"
    path: str
    image_encoder_path: str

    @property
    def content_dim(self) -> int:
        """Width of the content text embedding (projected for SDXL, pooled hidden for SD 1.5)."""
        if self.text_encoder_2 is not None:
            return self.text_encoder_2.config.projection_dim
        return self.text_encoder.config.hidden_size

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every pretrained network (they never train and are never checkpointed)."""
        mods = [self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder]
        return [m for m in mods if m is not None]


def model_family(unet: UNet2DConditionModel) -> str:
    """'sdxl' when the UNet takes SDXL's text+time micro-conditioning, else 'sd15'."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


# The installed packages' root (the repository, or site-packages): the committed toy base is data_tools/toy_base there.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def locate_base(path: str) -> str:
    """``path`` when it exists where you stand (or is a hub id); else that relative path under the installed packages.

    So ``data_tools/toy_base`` names the committed toy base from any folder, for every command.
    """
    here = Path(path).expanduser()
    if here.exists() or here.is_absolute():
        return str(here)
    packaged = PACKAGE_ROOT / path
    return str(packaged) if packaged.exists() else path


def looks_local(path: str) -> bool:
    """True for a folder path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x``), False for a hub id ``org/name``."""
    first = path.split("/")[0]
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(first).is_dir()


@contextmanager
def _quiet_loading(path: str) -> Iterator[None]:
    """No "Loading weights" bars for a local folder (nothing to download, so nothing to follow)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # A hub id may download: it keeps its progress bars.
    libraries = [lib for lib in (diffusers_logging, transformers_logging)
                 if Path(path).is_dir() and lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _load(cls, path: str, subfolder: str | None, dtype: torch.dtype | None):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if dtype is not None:
        kwargs["dtype"] = dtype  # `torch_dtype` is deprecated in transformers ≥ 4.56; diffusers ≥ 0.42 takes both
    try:
        with _quiet_loading(path):
            return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        from .model_ids import offline_download_hint

        where = f"{path}/{subfolder}" if subfolder else path
        raise BaseModelError(f"cannot load {cls.__name__} from {where}: {str(err).splitlines()[0]}"
                             + offline_download_hint(path)) from err


def resolve_image_encoder(path: str, image_encoder: str | None) -> tuple[str, str | None]:
    """(path, subfolder) of the image encoder: explicit, or ``PATH/image_encoder``."""
    if image_encoder:
        repo, _, sub = image_encoder.partition(":")
        return repo, sub or None
    if Path(path, "image_encoder").is_dir():
        return path, "image_encoder"
    raise BaseModelError(f"no image encoder: {path} has no image_encoder/ folder; set model.image_encoder "
                         "(e.g. h94/IP-Adapter:sdxl_models/image_encoder)")


def _config_only(cls, path: str, subfolder: str | None, dtype: torch.dtype):
    """The module built on the ``meta`` device from its config: shapes and config, no weights, no memory."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        with torch.device("meta"):
            if hasattr(cls, "load_config"):  # diffusers
                module = cls.from_config(cls.load_config(path, **kwargs))
            else:
                module = cls(cls.config_class.from_pretrained(path, **kwargs))
        return module if dtype == torch.float32 else module.to(dtype)
    except (OSError, ValueError) as err:
        from .model_ids import offline_download_hint

        where = f"{path}/{subfolder}" if subfolder else path
        raise BaseModelError(f"cannot read the {cls.__name__} config in {where}: {str(err).splitlines()[0]}"
                             + offline_download_hint(path)) from err


def load_base(path: str, *, image_encoder: str | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", check_content: bool = True, encoders: bool = True) -> BaseModel:
    """Load every frozen component in eval mode with ``requires_grad=False``.

    ``encoders=False`` (training from an embedding cache) loads the weights of the UNet and the
    scheduler only; the VAE, text and image encoders are config-only ``meta`` modules.
    """
    path = locate_base(path)
    if looks_local(path) and not Path(path).is_dir():
        raise BaseModelError(f"{path}: no such folder")  # not a hub id: don't ask the hub
    unet = _load(UNet2DConditionModel, path, "unet", dtype)
    family = model_family(unet)
    enc_path, enc_sub = resolve_image_encoder(path, image_encoder)
    load = _load if encoders else _config_only
    text_encoder_2 = load(CLIPTextModelWithProjection, path, "text_encoder_2", dtype) if family == "sdxl" else None
    base = BaseModel(
        unet=unet, vae=load(AutoencoderKL, path, "vae", dtype),
        text_encoder=load(CLIPTextModel, path, "text_encoder", dtype),
        tokenizer=_load(CLIPTokenizer, path, "tokenizer", None),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_load(CLIPTokenizer, path, "tokenizer_2", None) if family == "sdxl" else None,
        image_encoder=load(CLIPVisionModelWithProjection, enc_path, enc_sub, dtype),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        family=family, path=str(path),
        image_encoder_path=f"{enc_path}:{enc_sub}" if enc_sub else enc_path,
    )
    if check_content:
        check_content_space(base.image_encoder.config.projection_dim, base.content_dim)
    for module in base.frozen_modules():
        module.requires_grad_(False).eval()
        if module.device.type != "meta":
            module.to(device)
    return base


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, pooled) as the SDXL/SD1.5 pipelines compute them for the UNet."""
    def ids(tokenizer):
        return to_device(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids, base.unet.device)

    if base.family == "sd15":
        return base.text_encoder(ids(base.tokenizer))[0], None
    # SDXL: penultimate hidden states of both encoders, concatenated; pooled from encoder 2.
    out_1 = base.text_encoder(ids(base.tokenizer), output_hidden_states=True)
    out_2 = base.text_encoder_2(ids(base.tokenizer_2), output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return embeds, out_2.text_embeds
