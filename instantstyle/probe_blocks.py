"""Block probing: which attention blocks carry style, and which leak content?

Takes an adapter trained on ALL blocks, enables its image branch in one block at a time
(every other layer at scale exactly 0), generates the usual styles × prompts × seeds grid
and scores it with the evaluation metrics. The InstantStyle paper found this way that in
SDXL ``up_blocks.0.attentions.1`` carries style and ``down_blocks.2.attentions.1`` layout.

    python -m instantstyle.probe_blocks --base DIR --adapter FILE --styles STYLE_DIR \\
        --prompts FILE_OR_PROMPTS... --out REPORT_DIR [--seeds 0,1 --steps 30 --scale 1.0]

FLUX.1 works the same way with a FLUX adapter file (XLabs layout, trained with ``blocks=all``): one
double-stream block at a time (``double_blocks.K``). FLUX has no CLIP text tower in the image space,
so the metrics need ``--clip`` (e.g. openai/clip-vit-large-patch14), and ``--image-encoder`` names the
adapter's image encoder when the base folder has none.

Writes ``probe.json`` (means, per-block deltas against no adapter, the layers actually
enabled), ``probe.md`` (the table), ``probe.png`` (bar chart) and ``grid.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .blocks import block_names, block_of, cross_attention_layers
from .evaluate import (
    EvalConfig,
    EvalSetting,
    StyleReference,
    build_report,
    generate_setting,
    load_references,
    read_prompts,
    score_samples,
    write_report,
)
from .errors import GenerationError
from .generate import HelpFormatter, StyleGenerator, report_error, user_errors
from .quiet import quiet_libraries
from .safe_paths import write_atomic

# diffusers, transformers and the metrics load inside the functions that use them, so --help is instant.
if TYPE_CHECKING:
    from .metrics import ClipEmbedder

NO_ADAPTER, ALL_PRESET = "none", "all"
NO_FLUX_EMBEDDER = ("FLUX bases have no CLIP text tower in the image space: pass a CLIP evaluator "
                    "(--clip, e.g. openai/clip-vit-large-patch14)")


def is_flux(generator) -> bool:
    """True for a FLUX generator (double-stream blocks instead of UNet attention blocks)."""
    return generator.family == "flux"


def probe_blocks(generator) -> list[str]:
    """The blocks to probe one at a time: UNet attention blocks, or the FLUX adapter's double blocks."""
    if is_flux(generator):
        return generator.block_names()
    return block_names(cross_attention_layers(generator.pipe.unet.attn_processors))


def layer_block(layer: str) -> str:
    """The block of an enabled layer: ``transformer_blocks.K.attn.processor`` is FLUX's ``double_blocks.K``."""
    if layer.startswith("transformer_blocks."):
        from .flux_blocks import flux_block_name

        return flux_block_name(int(layer.split(".")[1]))
    return block_of(layer)


def probe_settings(generator: StyleGenerator, scale: float = 1.0, content_scale: float = 0.0) -> list[EvalSetting]:
    """No adapter (every scale 0), then each attention block alone, then all blocks together."""
    blocks = probe_blocks(generator)
    settings = [EvalSetting(NO_ADAPTER, ALL_PRESET, 0.0, 0.0)]
    settings += [EvalSetting(block, (block,), scale, content_scale) for block in blocks]
    return settings + [EvalSetting(ALL_PRESET, ALL_PRESET, scale, content_scale)]


def active_layers(generator: StyleGenerator) -> list[str]:
    """Cross-attention layers whose image branch currently has a non-zero scale (read from the UNet)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    if is_flux(generator):
        return generator.active_layers()
    if generator.adapter is not None:
        return [name for name, proc in zip(generator.adapter.layer_names, generator.adapter.layers) if proc.scale]
    return [name for name, proc in generator.pipe.unet.attn_processors.items()
            if isinstance(proc, IPAdapterAttnProcessor2_0) and any(s != 0 for s in proc.scale)]


def probe(generator: StyleGenerator, refs: Sequence[StyleReference], config: EvalConfig, *, scale: float = 1.0,
          content_scale: float = 0.0, embedder: ClipEmbedder | None = None) -> tuple[dict, list[dict]]:
    """Generate and score every probe setting; returns (report, samples with images)."""
    from tqdm.auto import tqdm

    from .metrics import ClipEmbedder

    settings = probe_settings(generator, scale, content_scale)
    if embedder is None and is_flux(generator):
        raise GenerationError(NO_FLUX_EMBEDDER)
    embedder = embedder or ClipEmbedder.from_pipeline(generator.pipe)
    generator.pipe.set_progress_bar_config(disable=True)
    samples: list[dict] = []
    enabled: dict[str, list[str]] = {}
    with tqdm(total=len(settings) * len(refs) * len(config.seeds), desc="probe", unit="row") as bar:
        for setting in settings:
            samples += generate_setting(generator, refs, setting, config, bar)
            # Record what the UNet really ran with, so the report proves one block at a time.
            enabled[setting.name] = active_layers(generator)
    score_samples(samples, refs, embedder)
    report = build_report(samples, settings, config, refs, {"probe_scale": scale, "content_scale": content_scale})
    add_deltas(report, enabled)
    return report, samples


def add_deltas(report: dict, enabled: dict[str, list[str]]) -> None:
    """Per setting: enabled layers/blocks and each metric minus its no-adapter value, in place."""
    from .metrics import METRICS

    baseline = next(s["mean"] for s in report["settings"] if s["name"] == NO_ADAPTER)
    for setting in report["settings"]:
        layers = enabled[setting["name"]]
        setting["enabled_layers"] = layers
        setting["enabled_blocks"] = list(dict.fromkeys(layer_block(layer) for layer in layers))
        setting["delta"] = {m: None if setting["mean"][m] is None or baseline[m] is None
                            else setting["mean"][m] - baseline[m] for m in METRICS}


def probe_table(report: dict) -> str:
    """Markdown: per block, style transfer and content leakage relative to no adapter."""
    def fmt(value: float | None, signed: bool = False) -> str:
        return "–" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"

    lines = ["| enabled | layers | style similarity ↑ | Δ style | text alignment ↑ | Δ text "
             "| content leakage ↓ | Δ leakage |", "|---|---|---|---|---|---|---|---|"]
    for s in report["settings"]:
        m, d = s["mean"], s["delta"]
        lines.append(f"| {s['name']} | {len(s['enabled_layers'])} | {fmt(m['style_similarity'])} | "
                     f"{fmt(d['style_similarity'], True)} | {fmt(m['text_alignment'])} | "
                     f"{fmt(d['text_alignment'], True)} | {fmt(m['content_leakage'])} | "
                     f"{fmt(d['content_leakage'], True)} |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: str | Path) -> Path:
    """Grouped bars per block: Δ style similarity, Δ text alignment, Δ content leakage vs no adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import METRICS

    rows = [s for s in report["settings"] if s["name"] != NO_ADAPTER]
    names = [s["name"].replace(".attentions.", ".a") for s in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.0))
    width = 0.27
    for i, (metric, colour) in enumerate(zip(METRICS, ("tab:purple", "tab:green", "tab:red"))):
        values = [s["delta"][metric] or 0.0 for s in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=f"Δ {metric}", color=colour)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("change vs. no adapter (cosine)")
    ax.set_title("One block at a time: style transferred vs. content leaked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue(), "probe chart")


def write_probe(report: dict, samples: list[dict], refs: Sequence[StyleReference], config: EvalConfig,
                out_dir: str | Path) -> None:
    """probe.json, probe.md, probe.png, plus the evaluation's metrics files and grid."""
    out_dir = Path(out_dir)
    write_report(report, samples, refs, config, out_dir)
    write_atomic(out_dir / "probe.json", json.dumps(report, indent=2), "probe report")
    write_atomic(out_dir / "probe.md", probe_table(report), "probe report")
    bar_chart(report, out_dir / "probe.png")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m instantstyle.probe_blocks``."""
    p = argparse.ArgumentParser(prog="python -m instantstyle.probe_blocks",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True, help="an adapter trained with blocks=all")
    p.add_argument("--styles", required=True, help="folder of style images (+ .txt content captions)")
    p.add_argument("--prompts", required=True, nargs="+", help="a prompts file (one per line) or the prompts")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--scale", type=float, default=1.0, help="image-branch scale of the enabled block")
    p.add_argument("--content-scale", type=float, default=0.0, help="λ of content subtraction (0 = none)")
    p.add_argument("--content-captions", help="JSON {image name: caption}; default: sidecar .txt files")
    p.add_argument("--cell", type=int, default=128, help="grid cell size in pixels")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--clip", help="CLIP folder/id with both towers for the metrics (default: the base's own "
                                  "pair; FLUX bases need one, e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--image-encoder", help="FLUX: the adapter's image encoder (REPO[:SUBFOLDER] or folder) when "
                                           "the base folder has no image_encoder/")
    return p


def load_generator(args: argparse.Namespace):
    """A FLUX generator for a FLUX adapter file (XLabs layout), else the SDXL/SD 1.5 StyleGenerator."""
    from .flux_export import is_flux_adapter_file

    if is_flux_adapter_file(args.adapter):
        from .flux_generate import FluxStyleGenerator

        if not args.clip:  # before minutes of loading a 12B base
            raise GenerationError(NO_FLUX_EMBEDDER)

        return FluxStyleGenerator.from_pretrained(args.base, args.adapter, image_encoder=args.image_encoder,
                                                  device=args.device)
    return StyleGenerator.from_pretrained(args.base, args.adapter, device=args.device)


def prompts_from(values: list[str]) -> list[str]:
    """A single existing file is read as a prompts file; anything else is the prompts themselves."""
    if len(values) == 1 and Path(values[0]).is_file():
        return read_prompts(values[0])
    return values


def main(argv: list[str] | None = None) -> int:
    """CLI entry: user errors print one ``error: ...`` line and exit 2."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        config = EvalConfig(prompts_from(args.prompts), [int(s) for s in args.seeds.split(",")], args.steps,
                            args.guidance, cell=args.cell)
        refs = load_references(args.styles, args.content_captions)
        from .metrics import ClipEmbedder

        generator = load_generator(args)
        embedder = ClipEmbedder.from_pretrained(args.clip, device=args.device) if args.clip else None
        report, samples = probe(generator, refs, config, scale=args.scale, content_scale=args.content_scale,
                                embedder=embedder)
    except (*user_errors(), ValueError) as err:
        return report_error(err)
    write_probe(report, samples, refs, config, args.out)
    print(probe_table(report), end="")
    print(f"probe written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
