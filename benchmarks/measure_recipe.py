"""Which training recipe makes a style-block adapter strongest at the least content leakage? Measured in the toy world.

    python -m benchmarks.measure_recipe --out recipe [--seeds 0,1,2,3 --steps 300]

For each block set (the toy UNet's style block; all blocks) and each recipe — plain training,
each reference augmentation alone (independent crop, flip, patch shuffle), content-decoupled
training, and combinations — adapters are trained on the committed toy base with several seeds,
then scored by the toy world's judge with exact ground truth: palette and texture match with the
reference (style ↑), the prompted shape drawn (text alignment ↑), the reference's shape drawn
(content leakage ↓). Decoupled recipes are also scored with the same subtraction at inference.
Writes recipe.json (every row), recipe.md (mean and 95% confidence interval over seeds) and recipe.png.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import toy_models
from benchmarks.shape_classifier import load_classifier
from data_tools.toy_data import references, render_dataset
from instantstyle.augment import ReferenceAugment
from instantstyle.blocks import resolve_blocks
from instantstyle.generate import StyleGenerator
from instantstyle.models import load_base
from benchmarks.measure_claim import SCORES, TRAIN_SEED, score_setting, summarise_by
from benchmarks.toy_adapter import train_toy_adapter

CROP = (0.3, 0.6)  # area fraction of the independent reference crop: the object is often cut or missing
SHUFFLE = 4  # 4×4 tiles of 16 px: smaller than the toy objects, so their shape is destroyed


@dataclass(frozen=True)
class Recipe:
    """Training-time options against content copying."""

    crop: bool = False
    flip: bool = False
    shuffle: bool = False
    content_scale: float = 0.0  # λ of content-decoupled training (0 = off)

    def augment(self) -> ReferenceAugment | None:
        """The reference augmentation chain, or None when no augmentation is on."""
        if not (self.crop or self.flip or self.shuffle):
            return None
        return ReferenceAugment(crop_scale=CROP if self.crop else None, crop_size=64,
                                flip_prob=0.5 if self.flip else 0.0, shuffle_grid=SHUFFLE if self.shuffle else 1)


RECIPES = {
    "plain": Recipe(),
    "crop": Recipe(crop=True),
    "flip": Recipe(flip=True),
    "shuffle": Recipe(shuffle=True),
    "decoupled": Recipe(content_scale=0.5),
    "crop+shuffle": Recipe(crop=True, shuffle=True),
    "crop+shuffle+decoupled": Recipe(crop=True, shuffle=True, content_scale=0.5),
}


def run_cell(base_dir: str, data, refs, classifier, blocks: str, name: str, seed: int, args) -> list[dict]:
    """Train one adapter and score it (and, for decoupled recipes, also with the matching inference subtraction)."""
    recipe = RECIPES[name]
    base = load_base(base_dir)  # fresh UNet processors for every adapter
    adapter = train_toy_adapter(base, data, resolve_blocks(blocks), steps=args.steps, lr=args.lr, seed=seed,
                                augment=recipe.augment(), content_scale=recipe.content_scale, progress=False)
    generator = StyleGenerator.from_base(base, adapter)
    generator.pipe.set_progress_bar_config(disable=True)
    rows = []
    for lam in dict.fromkeys((0.0, recipe.content_scale)):
        scores = score_setting(generator, classifier, refs, per_ref=args.per_ref, content_scale=lam, scale=1.0,
                               steps=args.sample_steps, seed=seed)
        rows.append({"blocks": blocks, "recipe": name, "inference_subtraction": lam, "seed": seed, **scores})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95% confidence half-width over seeds per (blocks, recipe, inference subtraction)."""
    return summarise_by(rows, ("blocks", "recipe", "inference_subtraction"), spread="ci")


def recipe_table(summary: list[dict]) -> str:
    """Markdown: mean ± 95% CI half-width over seeds."""
    lines = ["| blocks | recipe | inference λ | palette match ↑ | texture match ↑ | text alignment ↑ "
             "| content leakage ↓ | seeds |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = " | ".join(f"{s[k]:.2f} ± {s[k + '_ci']:.2f}" for k in SCORES)
        lines.append(f"| {s['blocks']} | {s['recipe']} | {s['inference_subtraction']:g} | {cells} | {s['seeds']} |")
    return "\n".join(lines) + "\n"


def recipe_plot(summary: list[dict], path: Path) -> None:
    """One row per cell, two panels (style ↑, leakage ↓): mean and 95% interval over seeds, no overlapping labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{'style block' if s['blocks'] != 'all' else 'all blocks'} · {s['recipe']}"
              + (f" · λ={s['inference_subtraction']:g} at inference" if s["inference_subtraction"] else "")
              for s in summary]
    colours = ["tab:blue" if s["blocks"] != "all" else "tab:orange" for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(summary) + 1.6), sharey=True)
    rows = list(range(len(summary)))[::-1]
    for ax, (key, title) in zip(axes, (("palette_match", "palette match ↑ (reference's style)"),
                                      ("content_leakage", "content leakage ↓ (reference's shape drawn)"))):
        for y, s, colour in zip(rows, summary, colours):
            ax.errorbar(s[key], y, xerr=s[key + "_ci"], fmt="o", color=colour, capsize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, labels, fontsize=8)
    fig.suptitle(f"Toy world: training recipes (mean and 95% CI over {summary[0]['seeds']} seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_cells(spec: str) -> list[tuple[str, str]]:
    """'BLOCKS:RECIPE,RECIPE;BLOCKS:RECIPE' → [(blocks, recipe), ...]; 'style' means the toy's style block."""
    cells = []
    for part in spec.split(";"):
        blocks, _, names = part.partition(":")
        blocks = toy_models.STYLE_BLOCK if blocks.strip() == "style" else blocks.strip()
        for name in names.split(","):
            if name.strip() not in RECIPES:
                raise ValueError(f"unknown recipe {name.strip()!r} — valid: {', '.join(RECIPES)}")
            cells.append((blocks, name.strip()))
    return cells


DEFAULT_CELLS = "style:" + ",".join(RECIPES) + ";all:plain,crop+shuffle,crop+shuffle+decoupled"


def main(argv: list[str] | None = None) -> None:
    """Run every cell for every seed; write recipe.json, recipe.md and recipe.png."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="data_tools/toy_base")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--cells", default=DEFAULT_CELLS, help="BLOCKS:RECIPE,...;BLOCKS:RECIPE,... ('style' = the toy's)")
    p.add_argument("--steps", type=int, default=300, help="adapter training steps (batch 16)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--refs", type=int, default=8, help="style references")
    p.add_argument("--per-ref", type=int, default=3, help="prompted shapes per reference")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--replot", action="store_true", help="only redraw OUT/recipe.md and recipe.png from recipe.json")
    args = p.parse_args(argv)
    if args.replot:
        summary = json.loads((Path(args.out) / "recipe.json").read_text())["summary"]
        (Path(args.out) / "recipe.md").write_text(recipe_table(summary))
        recipe_plot(summary, Path(args.out) / "recipe.png")
        return
    try:
        cells = parse_cells(args.cells)
    except ValueError as err:
        p.error(str(err))
    torch.set_num_threads(1)
    classifier = load_classifier(Path(args.base) / "classifier")
    data, refs = render_dataset(4000, 64, TRAIN_SEED, desc="adapter data"), references(args.refs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((out / "recipe.json").read_text())["rows"] if (out / "recipe.json").is_file() else []
    done = {(r["seed"], r["blocks"], r["recipe"]) for r in rows}  # a killed run continues where it stopped
    jobs = [(seed, blocks, name) for seed in (int(s) for s in args.seeds.split(",")) for blocks, name in cells
            if (seed, blocks, name) not in done]
    for seed, blocks, name in tqdm(jobs, desc="recipe cells"):
        rows += run_cell(args.base, data, refs, classifier, blocks, name, seed, args)
        tqdm.write(json.dumps(rows[-1]))
        (out / "recipe.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    summary = summarise(rows)
    (out / "recipe.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1) + "\n")
    (out / "recipe.md").write_text(recipe_table(summary))
    recipe_plot(summary, out / "recipe.png")
    print(recipe_table(summary))


if __name__ == "__main__":
    main()
