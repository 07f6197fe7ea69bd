"""InstantStyle inference: style-block injection plus content subtraction, on a stock SDXL pipeline.

    python -m instantstyle.generate --base DIR --adapter FILE --style-image IMG --prompt P \\
        [--prompt P2 ...] [--content-prompt C --content-scale 0.5 --scale 1.0 --blocks style] --out OUT.png

The style image is encoded once; ``image_embeds - λ · text_embeds(content prompt)`` is passed
to the pipeline as ``ip_adapter_image_embeds`` (zeros as the unconditional half, as diffusers
does), so any number of prompts and images per prompt share one call.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __name__ == "__main__":
    # Import-time notices of diffusers/transformers/bitsandbytes (optional backends absent) would
    # bury the CLI's one-line errors; they must be silenced before those packages are imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .blocks import UnknownBlockError, resolve_blocks
from .errors import AdapterFileError, GenerationError, OutputPathError
from .grid import make_grid
from .quiet import quiet_libraries
from .safe_paths import check_output_dir, check_output_file, save_image
from .threads import configure_cpu_threads

# torch, diffusers and transformers load inside the functions that use them, so that --help and
# argument errors answer at once instead of after seconds of imports.
if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from .adapter import AdapterSpec, InstantStyleAdapter
    from .models import BaseModel

ImageInput = Image.Image | str | Path
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions a user's input can cause: the CLIs print them as one line and exit 2."""
    from .content import ContentSpaceMismatch
    from .models import BaseModelError

    return GenerationError, AdapterFileError, BaseModelError, UnknownBlockError, ContentSpaceMismatch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None``, whose meaning the option's help explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when available, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class StyleGenerator:
    """A stock SDXL pipeline whose UNet carries an InstantStyle adapter."""

    def __init__(self, pipe: StableDiffusionXLPipeline, spec: AdapterSpec, blocks: list[str] | None,
                 adapter: InstantStyleAdapter | None = None) -> None:
        from .models import model_family
        from .pipeline import target_layers

        self.pipe = pipe
        self.spec = spec
        self.family = model_family(pipe.unet)
        self.blocks = blocks  # block prefixes the image branch is on (ALL_BLOCKS = every layer)
        self.adapter = adapter  # set only when our own processors are installed (training validation)
        target_layers(pipe.unet, blocks)  # fail early on unknown blocks

    @classmethod
    def from_pretrained(cls, base: str, adapter: str | Path, *, blocks: str | Sequence[str] | None = None,
                        image_encoder: str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", controlnet: str | None = None) -> StyleGenerator:
        """Load a base folder or model id and our export (target blocks from its metadata unless given).

        ``dtype`` None is float32.
        """
        import torch

        from .pipeline import load_pipeline, preflight

        from .models import locate_base

        dtype = torch.float32 if dtype is None else dtype
        base = locate_base(base)  # data_tools/toy_base from any folder, as model=toy in training
        preflight(base, adapter, blocks)  # one-line errors before gigabytes are loaded
        pipe = load_pipeline(base, image_encoder=image_encoder, dtype=dtype, device=device, controlnet=controlnet)
        return cls.from_pipeline(pipe, adapter, blocks=blocks)

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionXLPipeline, adapter: str | Path, *,
                      blocks: str | Sequence[str] | None = None) -> StyleGenerator:
        """Load an adapter file into diffusers' IP-Adapter processors of an existing pipeline."""
        from .models import model_family
        from .pipeline import feature_extractor_for, load_ip_weights

        if getattr(pipe, "image_encoder", None) is None:
            raise GenerationError("the pipeline has no image encoder: load it with "
                                  "image_encoder=CLIPVisionModelWithProjection.from_pretrained(...)")
        if pipe.feature_extractor is None:
            pipe.register_modules(feature_extractor=feature_extractor_for(pipe.image_encoder))
        spec = load_ip_weights(pipe, adapter)
        chosen = spec.blocks if blocks is None else resolve_blocks(blocks, model_family(pipe.unet))
        return cls(pipe, spec, list(chosen))

    @classmethod
    def from_base(cls, base: BaseModel, adapter: InstantStyleAdapter,
                  blocks: str | Sequence[str] | None = None) -> StyleGenerator:
        """Generate with an adapter installed in memory on ``base.unet`` (e.g. during training)."""
        from .pipeline import pipeline_from_base

        chosen = adapter.spec.blocks if blocks is None else resolve_blocks(blocks, base.family)
        return cls(pipeline_from_base(base), adapter.spec, list(chosen), adapter)

    def encode_style(self, style_image: ImageInput, *, content_prompt: str | None = None,
                     content_embeds: torch.Tensor | None = None,
                     content_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(style, unconditional) image embeddings, batch 1, with the content subtracted."""
        import torch

        from .content import encode_image, subtract_content
        from .pipeline import load_image

        image = load_image(style_image) if not isinstance(style_image, Image.Image) else style_image
        encoder = self.pipe.image_encoder
        pixels = self.pipe.feature_extractor(image, return_tensors="pt").pixel_values
        with torch.no_grad():
            embeds = encode_image(encoder, pixels, self.spec.adapter_type)
            # Same unconditional embedding as diffusers' encode_image: zeros, or the hidden states of a black image.
            if self.spec.adapter_type == "ip_adapter_plus":
                negative = encode_image(encoder, torch.zeros_like(pixels), self.spec.adapter_type)
            else:
                negative = torch.zeros_like(embeds)
            content = self.content_embedding(content_prompt, content_embeds)
            if content is not None:
                embeds = subtract_content(embeds, content.to(embeds.device), content_scale)
        return embeds, negative

    def content_embedding(self, content_prompt: str | None, content_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """Pooled projected text embedding (1, D) of the content prompt, or the one given."""
        if content_prompt is None and content_embeds is None:
            return None
        if content_prompt is not None and content_embeds is not None:
            raise GenerationError("give a content prompt or a content embedding, not both")
        if self.spec.adapter_type != "ip_adapter":
            raise GenerationError(f"content subtraction needs pooled image embeddings, but this adapter is "
                                  f"{self.spec.adapter_type}, which works on hidden states; drop the content prompt")
        if content_embeds is not None:
            return content_embeds.reshape(1, -1)
        from .content import encode_content_prompt

        encoder = self.pipe.text_encoder_2 or self.pipe.text_encoder
        tokenizer = self.pipe.tokenizer_2 or self.pipe.tokenizer
        return encode_content_prompt(encoder, tokenizer, content_prompt)

    def ip_adapter_image_embeds(self, style: torch.Tensor, negative: torch.Tensor,
                                guidance: float) -> list[torch.Tensor]:
        """diffusers' layout: one tensor (2, 1, ...) = [unconditional; conditional], or (1, 1, ...) without CFG.

        The pipeline repeats it for every prompt and image (batch_size · num_images_per_prompt).
        """
        import torch

        embeds = torch.cat([negative, style]) if guidance > 1.0 else style
        return [embeds.unsqueeze(1).to(self.pipe.unet.device, self.pipe.unet.dtype)]

    def set_scale(self, scale: float, blocks: list[str]) -> None:
        """``scale`` on the target blocks' layers, nothing anywhere else."""
        from .pipeline import set_layer_scales, target_layers

        if self.adapter is None:
            set_layer_scales(self.pipe.unet, blocks, scale)
            return
        target_layers(self.pipe.unet, blocks)
        self.adapter.set_scale({b: float(scale) for b in blocks})

    def resolve_blocks(self, blocks: str | Sequence[str] | None) -> list[str]:
        """Checked block list of a per-call override (``None`` keeps the generator's blocks)."""
        from .pipeline import target_layers

        if blocks is None:
            return self.blocks
        chosen = resolve_blocks(blocks, self.family)
        target_layers(self.pipe.unet, chosen)
        return chosen

    def generate(self, style_image: ImageInput, prompts: str | Sequence[str], *,
                 content_prompt: str | None = None, content_embeds: torch.Tensor | None = None,
                 content_scale: float = 1.0, scale: float = 1.0, blocks: str | Sequence[str] | None = None,
                 num_images: int = 1, seed: int = 0, steps: int = 30, guidance: float = 5.0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 control_image: ImageInput | None = None, control_scale: float = 1.0) -> list[Image.Image]:
        """``num_images`` images per prompt, ordered prompt by prompt; ``blocks`` overrides the targets."""
        import torch

        from .pipeline import attached_adapter

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or num_images < 1:
            raise GenerationError("need at least one prompt and num_images >= 1")
        style, negative = self.encode_style(style_image, content_prompt=content_prompt,
                                            content_embeds=content_embeds, content_scale=content_scale)
        self.set_scale(scale, self.resolve_blocks(blocks))
        kwargs = dict(
            prompt=prompts, negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            ip_adapter_image_embeds=self.ip_adapter_image_embeds(style, negative, guidance),
            num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed),
        )
        kwargs.update(self._control_kwargs(control_image, control_scale))
        attach = attached_adapter(self.pipe.unet, self.adapter) if self.adapter is not None else nullcontext()
        with attach:
            return list(self.pipe(**kwargs).images)

    def _control_kwargs(self, control_image: ImageInput | None, control_scale: float) -> dict:
        from diffusers import StableDiffusionXLControlNetPipeline

        from .pipeline import load_image

        is_control = isinstance(self.pipe, StableDiffusionXLControlNetPipeline)
        if is_control and control_image is None:
            raise GenerationError("this pipeline has a ControlNet: give a control image (--control-image)")
        if control_image is None:
            return {}
        if not is_control:
            raise GenerationError("a control image needs a ControlNet (--controlnet PATH)")
        image = control_image if isinstance(control_image, Image.Image) else load_image(control_image, "control image")
        return {"image": image, "controlnet_conditioning_scale": float(control_scale)}


def output_paths(out: Path, count: int) -> list[Path]:
    """Where the individual images go: ``out`` itself for one image, ``out-stem_i`` next to it otherwise."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m instantstyle.generate``."""
    p = argparse.ArgumentParser(prog="python -m instantstyle.generate",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--base", required=True, help="SDXL folder or model id")
    p.add_argument("--adapter", required=True, help="ip-adapter.safetensors exported by this project")
    p.add_argument("--style-image", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--content-prompt", help="describes the style image's content, subtracted in CLIP space")
    p.add_argument("--content-scale", type=float, default=1.0, help="λ in image_embeds - λ·text_embeds")
    p.add_argument("--scale", type=float, default=1.0, help="image-branch scale in the target blocks")
    p.add_argument("--blocks", help="style|layout|style_layout|all or a comma list (default: from the file)")
    p.add_argument("--image-encoder", help="repo[:subfolder] when the base has no image_encoder/")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, help="a multiple of 8 (default: the base model's size)")
    p.add_argument("--width", type=int, help="a multiple of 8 (default: the base model's size)")
    p.add_argument("--negative-prompt")
    p.add_argument("--controlnet", help="ControlNet folder or id for spatial control")
    p.add_argument("--control-image", help="conditioning image for --controlnet")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights' precision")
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--out", required=True, help=f"image file ({', '.join(IMAGE_SUFFIXES)}); with several "
                   "images a grid, the images saved beside it")
    return p


def check_args(args: argparse.Namespace) -> None:
    """``GenerationError`` for numbers and paths that would fail only after the model has loaded."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise GenerationError(f"--{name} must be a positive multiple of 8, got {value}")
    for name, value in (("steps", args.steps), ("num-images", args.num_images)):
        if value < 1:
            raise GenerationError(f"--{name} must be at least 1, got {value}")
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES or out.is_dir():
        raise GenerationError(f"--out {out} must be an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder is made before writing; the nearest existing part must be one
    if not existing.is_dir():
        raise GenerationError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    try:  # never a device, a symlink's target or a path under /proc
        check_output_dir(out.parent, f"--out folder {out.parent}")
        if out.parent.is_dir():
            for path in [out, *output_paths(out, len(args.prompt) * args.num_images)]:
                check_output_file(path, "--out")
    except OutputPathError as err:
        raise GenerationError(str(err)) from None


def run(args: argparse.Namespace) -> list[Path]:
    """Generate and save as the command line asks; returns the written paths."""
    check_args(args)
    import torch

    from .pipeline import load_image

    load_image(args.style_image)  # fail before loading a multi-gigabyte base
    if args.control_image:
        load_image(args.control_image, "control image")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = resolve_device(args.device)
    print(configure_cpu_threads(device=device), flush=True)
    generator = StyleGenerator.from_pretrained(args.base, args.adapter, blocks=args.blocks, dtype=dtype,
                                               image_encoder=args.image_encoder, device=device,
                                               controlnet=args.controlnet)
    images = generator.generate(
        args.style_image, args.prompt, content_prompt=args.content_prompt, content_scale=args.content_scale,
        scale=args.scale, num_images=args.num_images, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt,
        control_image=args.control_image, control_scale=args.control_scale,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, len(images))
    try:
        if len(images) > 1:
            save_image(make_grid(images, rows=len(args.prompt), cols=args.num_images), out, "--out")
        for image, path in zip(images, paths):
            save_image(image, path, "--out")
    except OutputPathError as err:  # a full disk, or the path changed while generating
        raise GenerationError(str(err)) from None
    return [out] + ([] if len(images) == 1 else paths)


def report_error(err: Exception) -> int:
    """Print ``error: <first line>`` to stderr; returns the exit status 2."""
    print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """CLI entry: user errors print one ``error: ...`` line and exit 2."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        paths = run(args)
    except GenerationError as err:  # its own clause: argument errors need not import the ML libraries
        return report_error(err)
    except user_errors() as err:
        return report_error(err)
    print(f"wrote {paths[0]}" + (f" and {len(paths) - 1} images beside it" if len(paths) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
