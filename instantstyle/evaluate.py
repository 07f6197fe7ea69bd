"""Evaluate an adapter on a fixed grid: style references × prompts × seeds, for one or more settings.

    python -m instantstyle.evaluate --base DIR --adapter FILE --styles STYLE_DIR --prompts FILE \\
        --out REPORT_DIR [--seeds 0,1 --steps 30 --content-scale 0,1 --blocks style --blocks all]
        [--csd CSD_CHECKPOINT --dino DINO_DIR]

Writes ``metrics.json`` (every sample and the means per setting), ``metrics.md`` (a table)
and ``grid.png`` (one row per setting, style and seed: the reference, then one image per
prompt). Content captions come from a ``.txt`` beside each style image or a JSON mapping.
``--csd`` adds CSD style similarity and ``--dino`` DINO content leakage (see ``style_metrics``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

if __name__ == "__main__":
    # Silence import-time notices of the ML libraries so that a user error stays one line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .baselines import NOISE, metric_baselines
from .errors import GenerationError, OutputPathError
from .generate import HelpFormatter, StyleGenerator, report_error, resolve_device, user_errors
from .safe_paths import check_output_dir, make_output_dir, save_image, write_atomic
from .grid import make_grid
from .quiet import quiet_libraries
from .threads import configure_cpu_threads

# torch, transformers and the metrics load inside the functions that use them, so --help is instant.
if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from .metrics import ClipEmbedder
    from .style_metrics import ImageEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Optional metrics that compare each generated image with its style reference through one encoder.
REFERENCE_METRICS = ("csd_style_similarity", "dino_content_leakage")  # functions of instantstyle.style_metrics
OPTIONAL_COLUMNS = {"csd_style_similarity": "CSD style ↑", "dino_content_leakage": "DINO leakage ↓"}


@dataclass(frozen=True)
class EvalSetting:
    """One way of generating: which blocks, image scale, and λ of content subtraction (0 = none)."""

    name: str = "default"
    blocks: str | tuple[str, ...] | None = None  # None = the adapter's own target blocks
    scale: float = 1.0
    content_scale: float = 0.0


@dataclass
class StyleReference:
    """A style image, its name in the report and the caption of its content (for leakage/subtraction)."""

    name: str
    image: Image.Image
    caption: str | None = None


@dataclass
class EvalConfig:
    """What is generated for every setting: prompts, seeds and sampler settings."""

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    cell: int = 256  # grid cell size in pixels


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise GenerationError(f"no prompts in {path}")
    return prompts


def load_references(styles: str | Path, captions: str | Path | None = None) -> list[StyleReference]:
    """Style images of a folder, sorted, with captions from a JSON mapping or sidecar ``.txt`` files."""
    from .pipeline import load_image

    folder = Path(styles)
    if not folder.is_dir():
        raise GenerationError(f"style folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise GenerationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    mapping = read_caption_mapping(captions) if captions else {}
    refs = []
    for path in paths:
        sidecar = path.with_suffix(".txt")
        caption = mapping.get(path.name, mapping.get(path.stem))
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text().strip() or None
        refs.append(StyleReference(path.stem, load_image(path), caption))
    return refs


def read_caption_mapping(path: str | Path) -> dict[str, str]:
    """``{"file name or stem": "caption"}`` from a JSON file."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GenerationError(f"cannot read content captions {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise GenerationError(f"{path} must map style image names to caption strings")
    return mapping


def generate_setting(generator: StyleGenerator, refs: Sequence[StyleReference], setting: EvalSetting,
                     config: EvalConfig, progress: tqdm | None = None) -> list[dict]:
    """Generate every (style, seed) row with all prompts; returns samples holding their images."""
    samples = []
    for ref in refs:
        subtract = setting.content_scale != 0
        if subtract and ref.caption is None:
            raise GenerationError(f"setting {setting.name!r} subtracts content but style {ref.name!r} has no caption")
        for seed in config.seeds:
            images = generator.generate(
                ref.image, config.prompts, content_prompt=ref.caption if subtract else None,
                content_scale=setting.content_scale, scale=setting.scale, blocks=setting.blocks, seed=seed,
                steps=config.steps, guidance=config.guidance, height=config.height, width=config.width,
            )
            samples += [{"setting": setting.name, "style": ref.name, "prompt": prompt, "seed": seed, "image": image}
                        for prompt, image in zip(config.prompts, images)]
            if progress is not None:
                progress.update(1)
    return samples


def score_samples(samples: list[dict], refs: Sequence[StyleReference], embedder: ClipEmbedder,
                  encoders: Mapping[str, ImageEncoder] | None = None) -> None:
    """Add the three CLIP metrics, and one per optional encoder, to every sample, in place."""
    import torch

    from .metrics import content_leakage, style_similarity, text_alignment

    generated = embedder.embed_images([s["image"] for s in samples])
    ref_index = {ref.name: i for i, ref in enumerate(refs)}
    ref_embeds = embedder.embed_images([ref.image for ref in refs])
    prompts = sorted({s["prompt"] for s in samples})
    prompt_embeds = dict(zip(prompts, embedder.embed_texts(prompts)))
    captioned = [ref for ref in refs if ref.caption]
    caption_embeds = dict(zip([r.name for r in captioned], embedder.embed_texts([r.caption for r in captioned])
                              if captioned else []))
    rows = [ref_index[s["style"]] for s in samples]
    style = style_similarity(generated, ref_embeds[rows])
    text = text_alignment(generated, torch.stack([prompt_embeds[s["prompt"]] for s in samples]))
    for i, sample in enumerate(samples):
        sample["style_similarity"], sample["text_alignment"] = float(style[i]), float(text[i])
        caption = caption_embeds.get(sample["style"])
        sample["content_leakage"] = (float(content_leakage(generated[i:i + 1], caption[None])[0])
                                     if caption is not None else None)
    for name, encoder in (encoders or {}).items():
        score_against_references(samples, refs, name, encoder)


def score_against_references(samples: list[dict], refs: Sequence[StyleReference], name: str,
                             encoder: ImageEncoder) -> None:
    """Add optional metric ``name`` (see REFERENCE_METRICS): generated image vs its style reference."""
    if name not in REFERENCE_METRICS:
        raise GenerationError(f"unknown metric {name!r}; valid: {', '.join(REFERENCE_METRICS)}")
    generated = encoder.embed_images([s["image"] for s in samples])
    ref_index = {ref.name: i for i, ref in enumerate(refs)}
    references = encoder.embed_images([ref.image for ref in refs])[[ref_index[s["style"]] for s in samples]]
    from . import style_metrics

    for sample, value in zip(samples, getattr(style_metrics, name)(generated, references)):
        sample[name] = float(value)


def evaluate_settings(generator: StyleGenerator, refs: Sequence[StyleReference], settings: Sequence[EvalSetting],
                      config: EvalConfig, out_dir: str | Path | None = None,
                      embedder: ClipEmbedder | None = None, meta: dict | None = None,
                      encoders: Mapping[str, ImageEncoder] | None = None) -> dict:
    """Generate and score every setting; writes metrics.json, metrics.md and grid.png when ``out_dir``.

    ``encoders`` maps optional metric names (``REFERENCE_METRICS``) to their image encoders.
    """
    from tqdm.auto import tqdm

    from .metrics import ClipEmbedder

    if len({s.name for s in settings}) != len(settings):
        raise GenerationError("evaluation settings need distinct names")
    for setting in settings:  # fail before generating anything
        generator.resolve_blocks(setting.blocks)
    embedder = embedder or ClipEmbedder.from_pipeline(generator.pipe)
    generator.pipe.set_progress_bar_config(disable=True)  # one outer bar instead of one per call
    jobs = len(settings) * len(refs) * len(config.seeds)
    samples: list[dict] = []
    with tqdm(total=jobs, desc="evaluate", unit="row") as progress:
        for setting in settings:
            samples += generate_setting(generator, refs, setting, config, progress)
    score_samples(samples, refs, embedder, encoders)
    report = build_report(samples, settings, config, refs, meta or {})
    by_kind = metric_baselines(samples, [r.name for r in refs],
                               lambda rows: score_samples(rows, refs, embedder, encoders))
    # baselines: metric -> the noise images' score (every metric has one; train.sweep shows it beside the score)
    report["baselines"] = {k: v for k, v in by_kind[NOISE].items() if v is not None}
    report["baselines_by_kind"] = by_kind
    if out_dir is not None:
        write_report(report, samples, refs, config, Path(out_dir))
    return report


def evaluate_adapter(generator: StyleGenerator, refs: Sequence[StyleReference], config: EvalConfig,
                     out_dir: str | Path | None = None, setting: EvalSetting = EvalSetting(),
                     embedder: ClipEmbedder | None = None,
                     encoders: Mapping[str, ImageEncoder] | None = None) -> dict[str, float | None]:
    """Means of the metrics for one setting (training validation calls this); report files if ``out_dir``."""
    report = evaluate_settings(generator, refs, [setting], config, out_dir, embedder, encoders=encoders)
    return report["settings"][0]["mean"]


def build_report(samples: list[dict], settings: Sequence[EvalSetting], config: EvalConfig,
                 refs: Sequence[StyleReference], meta: dict) -> dict:
    """The JSON-able report: run description, then per setting its means and samples."""
    from .metrics import mean_metrics

    entries = []
    for setting in settings:
        rows = [{k: v for k, v in s.items() if k not in ("image", "setting")}
                for s in samples if s["setting"] == setting.name]
        entries.append({**asdict(setting), "mean": mean_metrics(rows), "num_samples": len(rows), "samples": rows})
    run = {k: v for k, v in asdict(config).items() if k != "cell"}
    return {**meta, **run, "styles": {r.name: r.caption for r in refs}, "settings": entries}


def markdown_table(report: dict) -> str:
    """Means per setting as a Markdown table (↑ higher is better, ↓ lower is better)."""
    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    optional = [n for n in OPTIONAL_COLUMNS if any(n in s["mean"] for s in report["settings"])]
    extra_head = "".join(f" {OPTIONAL_COLUMNS[n]} |" for n in optional)
    lines = ["| setting | blocks | scale | content scale | style similarity ↑ | text alignment ↑ "
             f"| content leakage ↓ |{extra_head} n |", "|---|---|---|---|---|---|---|---|" + "---|" * len(optional)]
    for s in report["settings"]:
        blocks = "adapter's" if s["blocks"] is None else s["blocks"] if isinstance(s["blocks"], str) \
            else ",".join(s["blocks"])
        m = s["mean"]
        extra = "".join(f" {fmt(m.get(n))} |" for n in optional)
        lines.append(f"| {s['name']} | {blocks} | {s['scale']:g} | {s['content_scale']:g} | "
                     f"{fmt(m['style_similarity'])} | {fmt(m['text_alignment'])} | {fmt(m['content_leakage'])} "
                     f"|{extra} {s['num_samples']} |")
    for name, m in report.get("baselines_by_kind", {}).items():  # next to the scores: what no style transfer gives
        extra = "".join(f" {fmt(m.get(n))} |" for n in optional)
        lines.append(f"| baseline: {name} | – | – | – | {fmt(m['style_similarity'])} | {fmt(m['text_alignment'])} "
                     f"| {fmt(m['content_leakage'])} |{extra} – |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, samples: list[dict], refs: Sequence[StyleReference], config: EvalConfig,
                 out_dir: Path) -> None:
    """metrics.json, metrics.md and grid.png (rows: setting × style × seed; columns: reference, prompts)."""
    try:
        make_output_dir(out_dir, "report folder")
        write_atomic(out_dir / "metrics.json", json.dumps(report, indent=2), "report")
        write_atomic(out_dir / "metrics.md", markdown_table(report), "report")
    except OutputPathError as err:
        raise GenerationError(str(err)) from None
    by_ref = {r.name: r.image for r in refs}
    settings = {s["name"]: s for s in report["settings"]}
    cols = len(config.prompts)
    tiles, row_labels = [], []
    for start in range(0, len(samples), cols):  # samples come row by row, prompts in order
        first = samples[start]
        tiles += [by_ref[first["style"]]] + [s["image"] for s in samples[start:start + cols]]
        row_labels.append(row_label(settings[first["setting"]], first["style"], first["seed"]))
    grid = make_grid(tiles, rows=len(row_labels), cols=cols + 1, cell=config.cell,
                     column_labels=["reference", *config.prompts], row_labels=row_labels)
    try:
        save_image(grid, out_dir / "grid.png", "report grid")
    except OutputPathError as err:
        raise GenerationError(str(err)) from None


def row_label(setting: dict, style: str, seed: int) -> str:
    """What a grid row shows: style and seed, blocks, scale and λ (the default font has no Greek)."""
    blocks = setting["blocks"]
    blocks = "adapter's" if blocks is None else blocks if isinstance(blocks, str) else ",".join(blocks)
    lam = setting["content_scale"]
    subtraction = "content subtracted" if lam else "no content subtraction"
    return f"{style}, seed {seed}\nblocks {blocks}\nscale {setting['scale']:g}\nlambda={lam:g} ({subtraction})"


def parse_settings(blocks: list[str] | None, scales: str, content_scales: str) -> list[EvalSetting]:
    """Every combination of ``--blocks`` (repeatable), ``--scale`` and ``--content-scale`` (comma lists)."""
    try:
        scale_values = [float(x) for x in scales.split(",")]
        content_values = [float(x) for x in content_scales.split(",")]
    except ValueError as err:
        raise GenerationError(f"scales must be comma-separated numbers: {err}") from err
    settings = []
    for block in blocks or [None]:
        for scale in scale_values:
            for lam in content_values:
                name = f"blocks={block or 'adapter'} scale={scale:g} content={lam:g}"
                settings.append(EvalSetting(name, block, scale, lam))
    return settings


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m instantstyle.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m instantstyle.evaluate",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--styles", required=True, help="folder of style reference images (+ optional .txt captions)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, help="a multiple of 8 (default: the base model's size)")
    p.add_argument("--width", type=int, help="a multiple of 8 (default: the base model's size)")
    p.add_argument("--content-captions", help="JSON {image name: caption}; default: sidecar .txt files")
    p.add_argument("--content-scale", default="0", help="comma list of λ; 0 = no subtraction")
    p.add_argument("--scale", default="1.0", help="comma list of image-branch scales")
    p.add_argument("--blocks", action="append", help="repeat to compare block sets (default: the adapter's)")
    p.add_argument("--evaluator", help="CLIP folder or id to score with (default: the base's encoders)")
    p.add_argument("--image-encoder", help="repo[:subfolder] when the base has no image_encoder/")
    p.add_argument("--csd", metavar="PATH", help="CSD checkpoint (.pth or .safetensors): adds CSD style similarity")
    p.add_argument("--dino", metavar="PATH", help="DINO/DINOv2 model folder: adds DINO content leakage")
    p.add_argument("--cell", type=int, default=256, help="grid cell size in pixels")
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the command line asks; returns the report."""
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        raise GenerationError(f"--seeds must be comma-separated integers: {err}") from err
    config = EvalConfig(read_prompts(args.prompts), seeds, args.steps,
                        args.guidance, args.height, args.width, args.cell)
    refs = load_references(args.styles, args.content_captions)
    settings = parse_settings(args.blocks, args.scale, args.content_scale)
    from .metrics import ClipEmbedder

    device = resolve_device(args.device)
    print(configure_cpu_threads(device=device), flush=True)
    encoders = load_metric_encoders(args.csd, args.dino, device)  # before the base: a bad path fails fast
    generator = StyleGenerator.from_pretrained(args.base, args.adapter, image_encoder=args.image_encoder,
                                               device=device)
    embedder = ClipEmbedder.from_pretrained(args.evaluator, device) if args.evaluator else None
    meta = {"base": args.base, "adapter": str(args.adapter), "evaluator": args.evaluator or "base",
            **({"csd": args.csd} if args.csd else {}), **({"dino": args.dino} if args.dino else {})}
    return evaluate_settings(generator, refs, settings, config, Path(args.out), embedder, meta, encoders)


def load_metric_encoders(csd: str | None, dino: str | None, device: str = "cpu") -> dict[str, ImageEncoder]:
    """Encoders of the optional metrics whose model paths are given (none: today's CLIP metrics only)."""
    if not (csd or dino):
        return {}
    from .style_metrics import CsdEncoder, DinoEncoder

    encoders: dict[str, ImageEncoder] = {}
    if csd:
        encoders["csd_style_similarity"] = CsdEncoder.from_checkpoint(csd, device)
    if dino:
        encoders["dino_content_leakage"] = DinoEncoder.from_pretrained(dino, device)
    return encoders


def main(argv: list[str] | None = None) -> int:
    """CLI entry: user errors print one ``error: ...`` line and exit 2."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        check_output_dir(args.out, f"--out {args.out}")  # before hours of generation
        report = run(args)
    except OutputPathError as err:
        return report_error(err)
    except GenerationError as err:  # its own clause: argument errors need not import the ML libraries
        return report_error(err)
    except user_errors() as err:
        return report_error(err)
    print(markdown_table(report), end="")
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
