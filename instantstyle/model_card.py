"""The files that go beside an exported adapter: model card (README.md), training record, sample grid.

The record (``training.json``) is the machine-readable truth; the card is rendered from it, so
the two never disagree. ``usage_for_unet`` works out what a user sets in diffusers and in
ComfyUI_IPAdapter_plus to inject into exactly the trained blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .blocks import ALL_BLOCKS, UnknownBlockError, block_of, cross_attention_layers, select_layers
from .model_ids import is_hub_id
from .safe_paths import write_atomic

CARD_NAME, RECORD_NAME, SAMPLES_NAME = "README.md", "training.json", "samples.png"
RECORD_FORMAT = "instantstyle-training-record"
# ComfyUI_IPAdapter_plus hard-codes the layer numbering of these two UNets (cross-attention dim, layers).
COMFYUI_LAYOUTS = {"sdxl": (2048, 70), "sd15": (768, 16)}
# Its weight types that inject into fixed transformer indices (execution order: input, middle, output).
COMFYUI_WEIGHT_TYPES = {
    "sdxl": {"style transfer": [6], "composition": [3], "style and composition": [3, 6]},
    "sd15": {},  # its SD 1.5 "style transfer" spans 11 blocks; no trained block set here matches one
}
TAGS = {"sdxl": "stable-diffusion-xl", "sd15": "stable-diffusion", "flux": "flux"}


def comfyui_transformer_indices(layer_names: Sequence[str]) -> dict[str, int]:
    """Each attention block's ComfyUI ``transformer_index``: its position in the UNet's execution order.

    ComfyUI counts SpatialTransformer blocks as they run: down blocks, then the middle, then up blocks
    (diffusers lists the middle last).
    """
    blocks = dict.fromkeys(block_of(name) for name in cross_attention_layers(layer_names))
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    ranked = sorted(enumerate(blocks), key=lambda item: (order[item[1].split(".")[0]], item[0]))
    return {block: index for index, (_, block) in enumerate(ranked)}


def comfyui_usage(layer_names: Sequence[str], blocks: Sequence[str], *, family: str, cross_attention_dim: int,
                  adapter_type: str, num_tokens: int, resampler_dim: int) -> dict:
    """Whether ComfyUI_IPAdapter_plus loads the file, and the weight type / layer weights of the trained blocks."""
    problem = comfyui_problem(len(cross_attention_layers(layer_names)), family=family,
                              cross_attention_dim=cross_attention_dim, adapter_type=adapter_type,
                              num_tokens=num_tokens, resampler_dim=resampler_dim)
    trained = {block_of(name) for name in select_layers(list(layer_names), list(blocks))}
    index = comfyui_transformer_indices(layer_names)
    indices = sorted(index[b] for b in trained)
    named = [name for name, wanted in COMFYUI_WEIGHT_TYPES.get(family, {}).items() if wanted == indices]
    whole = tuple(blocks) == ALL_BLOCKS
    return {"loads": problem is None, "problem": problem, "transformer_indices": indices,
            "weight_type": named[0] if named else "linear",
            "layer_weights": "" if whole else ",".join(f"{i}:1" for i in indices)}


def comfyui_problem(num_layers: int, *, family: str, cross_attention_dim: int, adapter_type: str,
                    num_tokens: int, resampler_dim: int) -> str | None:
    """Why ComfyUI_IPAdapter_plus cannot use the file, or None when it can."""
    if family not in COMFYUI_LAYOUTS or COMFYUI_LAYOUTS[family] != (cross_attention_dim, num_layers):
        return (f"ComfyUI_IPAdapter_plus numbers layers for the SDXL (70) and SD 1.5 (16) UNets only; "
                f"this base has {num_layers} cross-attention layers of width {cross_attention_dim}")
    if adapter_type == "ip_adapter_plus":
        width = 1280 if family == "sdxl" else cross_attention_dim
        if (num_tokens, resampler_dim) != (16, width):
            return f"ComfyUI_IPAdapter_plus builds Plus resamplers with 16 tokens of width {width}"
    elif num_tokens != 4:
        return "ComfyUI_IPAdapter_plus builds the plain projection with 4 tokens"
    return None


def usage_for_unet(unet, spec) -> dict:
    """The diffusers scale dict and the ComfyUI settings for an adapter ``spec`` on ``unet``."""
    from .models import model_family
    from .pipeline import diffusers_scale_dict

    names = list(unet.attn_processors.keys())
    family = model_family(unet)
    try:
        scale = diffusers_scale_dict(unet, spec.blocks, 1.0)
    except UnknownBlockError:  # part of a block: diffusers cannot address it, and 1.0 is the same (the rest is zero)
        scale = 1.0
    return {"diffusers_scale": scale,
            "comfyui": comfyui_usage(names, spec.blocks, family=family,
                                     cross_attention_dim=unet.config.cross_attention_dim,
                                     adapter_type=spec.adapter_type, num_tokens=spec.num_tokens,
                                     resampler_dim=spec.resampler_dim)}


def write_share_files(folder: Path, record: dict, samples: Path | None = None) -> None:
    """README.md, training.json and (when a grid exists) samples.png in the export folder."""
    record = {**record, "samples": SAMPLES_NAME if samples is not None else None}
    if samples is not None:  # never over a device or through a symlink planted in the folder
        write_atomic(folder / SAMPLES_NAME, samples.read_bytes(), "samples grid")
    write_atomic(folder / RECORD_NAME, json.dumps(record, indent=2) + "\n", "training record")
    write_atomic(folder / CARD_NAME, render_card(record), "model card")


def render_card(record: dict) -> str:
    """The model card: Hub front matter, then what it is, samples, usage and the training record."""
    sections = [front_matter(record), summary_section(record), samples_section(record)]
    if record["family"] == "flux":
        sections.append(flux_usage(record))
    elif record["adapter"].get("layout") == "compact":
        sections.append(compact_usage(record))
    else:
        sections += [diffusers_usage(record), comfyui_section(record)]
    sections.append(training_section(record))
    return "\n".join(sections)


def front_matter(record: dict) -> str:
    """YAML front matter the Hub reads; the license is the publisher's choice and left to them."""
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if is_hub_id(record["base_model"]):
        lines.append(f"base_model: {record['base_model']}")
    lines += ["# license: choose one before publishing (https://huggingface.co/docs/hub/repositories-licenses)",
              "tags:", *(f"- {t}" for t in ("ip-adapter", "instantstyle", "style-transfer",
                                           TAGS.get(record["family"], record["family"]), "text-to-image")), "---"]
    return "\n".join(lines) + "\n"


def summary_section(record: dict) -> str:
    """Title and one paragraph: which blocks, which projection, which base."""
    a, t = record["adapter"], record["training"]
    blocks = ", ".join(f"`{b}`" for b in a["target_blocks"])
    layers = "double-stream blocks" if record["family"] == "flux" else "cross-attention layers"
    return (f"# InstantStyle adapter ({a['type']}, {record['family']})\n\n"
            f"An IP-Adapter whose image branch exists only in {blocks} ({a['trained_layers']} of "
            f"{a['all_layers']} {layers}), trained with InstantStyle "
            f"{record['framework_version']} for {t['steps']} steps on `{record['base_model']}` with the image "
            f"encoder `{record['image_encoder']}`; {a['num_tokens']} image tokens. Every other layer's image "
            "branch is zero, so it adds nothing at any scale.\n")


def samples_section(record: dict) -> str:
    """The grid, or the command that makes one."""
    if record.get("samples"):
        return f"## Samples\n\n![samples]({record['samples']})\n"
    if record["family"] == "flux":  # no validation grid or evaluate command for FLUX here
        return ("## Samples\n\nGenerate a few images with the snippet below, save them as `samples.png` "
                "and add `![samples](samples.png)` to this card.\n")
    return ("## Samples\n\nThis run had no style references. To add a grid, generate one and copy it here:\n\n"
            "```bash\npython -m instantstyle.evaluate --base BASE --adapter ip-adapter.safetensors "
            "--styles STYLE_DIR --prompts prompts.txt --out eval\ncp eval/grid.png samples.png\n```\n"
            "then add `![samples](samples.png)` to this card.\n")


def encoder_lines(record: dict) -> list[str]:
    """Python lines that load the image encoder the adapter was trained with."""
    repo, _, sub = record["image_encoder"].partition(":")
    if not is_hub_id(repo):
        repo = f"PATH/TO/{repo.split('@')[0]}"  # a local folder: only its name is recorded
    args = f'"{repo}"' + (f', subfolder="{sub}"' if sub else "")
    return [f"image_encoder = CLIPVisionModelWithProjection.from_pretrained({args}, torch_dtype=dtype)"]


def diffusers_usage(record: dict) -> str:
    """A snippet that runs as written once ``adapter`` names this folder or its Hub repo."""
    pipeline = "StableDiffusionXLPipeline" if record["family"] == "sdxl" else "StableDiffusionPipeline"
    base = record["base_model"] if is_hub_id(record["base_model"]) else f"PATH/TO/{record['base_model'].split('@')[0]}"
    scale = json.dumps(record["usage"]["diffusers_scale"])
    code = ["import torch", f"from diffusers import {pipeline}", "from diffusers.utils import load_image",
            "from transformers import CLIPVisionModelWithProjection", "",
            'adapter = "."  # this folder, or the Hub repo id this card belongs to',
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            "dtype = torch.float16 if device == \"cuda\" else torch.float32", *encoder_lines(record),
            f'pipe = {pipeline}.from_pretrained("{base}", image_encoder=image_encoder, torch_dtype=dtype).to(device)',
            f'pipe.load_ip_adapter(adapter, subfolder="", weight_name="{record["adapter"]["weights_file"]}")',
            f"pipe.set_ip_adapter_scale({scale})  # the image branch in the trained blocks only",
            'style = load_image("style.png")',
            'image = pipe("a cat, masterpiece", ip_adapter_image=style, num_inference_steps=30).images[0]',
            'image.save("cat.png")']
    return ("## Use with diffusers\n\n```python\n" + "\n".join(code) + "\n```\n\n"
            "`python -m instantstyle.generate --base BASE --adapter ip-adapter.safetensors --style-image style.png "
            "--prompt P --content-prompt C --content-scale 0.5` adds InstantStyle's content subtraction.\n")


def compact_usage(record: dict) -> str:
    """A compact file holds the trained layers only: InstantStyle completes it from the base, stock loaders cannot."""
    return ("## Use\n\nThis is a compact export (the trained layers only). InstantStyle loads it as it is:\n\n"
            f"```bash\npython -m instantstyle.generate --base BASE --adapter {record['adapter']['weights_file']} "
            "--style-image style.png --prompt \"a cat\" --out cat.png\n```\n\n"
            "Stock diffusers and ComfyUI need every layer: export the checkpoint again without `--compact`.\n")


def comfyui_section(record: dict) -> str:
    """Which nodes and which weight type give the trained blocks in ComfyUI_IPAdapter_plus."""
    c = record["usage"]["comfyui"]
    if not c["loads"]:
        return f"## Use in ComfyUI\n\nNot loadable by ComfyUI_IPAdapter_plus: {c['problem']}.\n"
    text = ("## Use in ComfyUI (ComfyUI_IPAdapter_plus)\n\n"
            f"1. Copy `{record['adapter']['weights_file']}` to `ComfyUI/models/ipadapter/` and the image encoder "
            f"`{record['image_encoder']}` to `ComfyUI/models/clip_vision/`.\n"
            "2. Load them with **IPAdapter Model Loader** and **Load CLIP Vision**.\n"
            f"3. Apply with **IPAdapter Advanced**, weight type **{c['weight_type']}**")
    if c["weight_type"] == "linear" and c["layer_weights"]:
        text += (" (it covers every layer, and the untrained ones are zero, so it acts on the trained blocks only); "
                 f"to address them exactly, use **IPAdapter Mad Scientist** with layer_weights `{c['layer_weights']}`")
    return text + f".\n\nComfyUI's transformer indices of the trained blocks: {c['transformer_indices']}.\n"


def flux_usage(record: dict) -> str:
    """FLUX: diffusers' FluxPipeline reads the XLabs layout this file is in."""
    repo, _, sub = record["image_encoder"].partition(":")
    encoder = f'image_encoder_pretrained_model_name_or_path="{repo}"' + (f', image_encoder_subfolder="{sub}"' if sub else "")
    return ("## Use with diffusers (FLUX)\n\n```python\nimport torch\nfrom diffusers import FluxPipeline\n"
            "from diffusers.utils import load_image\n\n"
            f'pipe = FluxPipeline.from_pretrained("{record["base_model"]}", torch_dtype=torch.bfloat16).to("cuda")\n'
            f'pipe.load_ip_adapter(".", weight_name="{record["adapter"]["weights_file"]}", {encoder})\n'
            "pipe.set_ip_adapter_scale(1.0)  # blocks without a trained branch are zero\n"
            'image = pipe("a cat", ip_adapter_image=load_image("style.png"), num_inference_steps=28).images[0]\n'
            "```\n\nComfyUI_IPAdapter_plus does not load FLUX adapters; the file is in XLabs' layout.\n")


def training_section(record: dict) -> str:
    """The key numbers of the record as a table; training.json holds all of them."""
    t, d, m = record["training"], record["data"], record["metrics"]
    loss = m.get("final_loss")
    rows = [("steps", f"{t['steps']} of {t.get('max_steps')}"), ("samples seen", t.get("samples_seen")),
            ("batch (global)", t.get("global_batch")), ("learning rate", t.get("lr")),
            ("precision", t.get("mixed_precision")), ("EMA decay", t.get("ema") or "off"),
            ("data", f"{d.get('samples') or '?'} samples, {d.get('shards') or '?'} shard file(s)"),
            ("resolution", d.get("resolution")), ("buckets", d.get("buckets")),
            ("final training loss", "–" if loss is None else f"{loss:.4f}")]
    for name, report in (m.get("validation") or {}).items():
        means = ", ".join(f"{k} {v:.4f}" for k, v in report["mean"].items() if isinstance(v, float))
        rows.append((f"validation ({name}, step {report['step']})", means))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Training\n\n| | |\n|---|---|\n{table}\n\nEverything else: `{RECORD_NAME}`.\n"
