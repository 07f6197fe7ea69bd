"""The InstantStyle claim, measured in the toy world with exact ground truth.

Trains adapters with blocks = style, style_layout and all (several seeds), then generates
each reference's style with prompts naming OTHER objects, with and without content
subtraction. The classifier reads back: palette/texture match with the reference (style
transfer), the prompted object (text alignment), the reference's object (content leakage).
The paper's finding holds here if style-only injection keeps most of the style transfer of
all-block injection while leaking less content and following the prompt better, and if
subtraction lowers leakage further.

    python -m benchmarks.measure_claim --base data_tools/toy_base --out claim [--seeds 0,1 --steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import toy_models
from data_tools import synthetic
from benchmarks.shape_classifier import ground_truth_scores, load_classifier
from data_tools.toy_data import prompt_shapes, reference_image, references, render_dataset
from instantstyle.blocks import UnknownBlockError, resolve_blocks
from instantstyle.generate import StyleGenerator
from instantstyle.models import load_base
from benchmarks.toy_adapter import train_toy_adapter

# SDXL's style block, the toy UNet's own (toy_models.STYLE_BLOCK) and all blocks. Any preset or
# block name works (--block-sets).
BLOCK_SETS = ("style", toy_models.STYLE_BLOCK, "all")
SCORES = ("palette_match", "texture_match", "text_alignment", "content_leakage")
TRAIN_SEED = 20_000  # disjoint from pretraining, the card's held-out set and the references


def score_setting(generator: StyleGenerator, classifier, refs: list[dict], *, per_ref: int, content_scale: float,
                  scale: float, steps: int, seed: int) -> dict[str, float]:
    """Mean ground-truth scores over references × prompted shapes."""
    totals = dict.fromkeys(SCORES, 0.0)
    for i, ref in enumerate(refs):
        shapes = prompt_shapes(ref, per_ref)
        images = generator.generate(reference_image(ref), [f"a {s}" for s in shapes], scale=scale,
                                    content_prompt=synthetic.content_caption(ref) if content_scale else None,
                                    content_scale=content_scale, steps=steps, seed=seed + i, height=64, width=64)
        for shape, image in zip(shapes, images):
            for k, v in ground_truth_scores(classifier, [image], ref, shape).items():
                totals[k] += v
    return {k: v / (len(refs) * per_ref) for k, v in totals.items()}


def run_claim(base_dir: str, seeds: list[int], *, steps: int, num_refs: int, per_ref: int,
              content_scale: float, sample_steps: int, num_train: int = 4000,
              block_sets: tuple[str, ...] = BLOCK_SETS, lr: float = 3e-3) -> list[dict]:
    """One row per (seed, block set, subtraction on/off), plus the no-adapter baseline per seed."""
    classifier = load_classifier(Path(base_dir) / "classifier")
    data = render_dataset(num_train, 64, TRAIN_SEED, desc="adapter data")
    refs, rows = references(num_refs), []
    kwargs = dict(per_ref=per_ref, steps=sample_steps)
    for seed in seeds:
        for blocks in block_sets:
            base = load_base(base_dir)  # fresh UNet processors for every adapter
            adapter = train_toy_adapter(base, data, resolve_blocks(blocks), steps=steps, lr=lr, seed=seed)
            generator = StyleGenerator.from_base(base, adapter)
            generator.pipe.set_progress_bar_config(disable=True)
            if blocks == block_sets[0]:
                rows.append({"seed": seed, "blocks": "none", "subtraction": False,
                             **score_setting(generator, classifier, refs, content_scale=0.0, scale=0.0,
                                             seed=seed, **kwargs)})
            for lam in (0.0, content_scale):
                rows.append({"seed": seed, "blocks": blocks, "subtraction": bool(lam),
                             **score_setting(generator, classifier, refs, content_scale=lam, scale=1.0,
                                             seed=seed, **kwargs)})
                tqdm.write(json.dumps(rows[-1]))
    return rows


def summarise_by(rows: list[dict], keys: tuple[str, ...], spread: str = "std") -> list[dict]:
    """Mean over seeds per group of ``keys``, with the standard deviation (``_std``) or a 95% interval (``_ci``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, group in groups.items():
        entry = {**dict(zip(keys, key)), "seeds": len(group)}
        for k in SCORES:
            values = [r[k] for r in group]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[k] = statistics.mean(values)
            entry[f"{k}_{spread}"] = std if spread == "std" else half_interval(std, len(values))
        out.append(entry)
    return out


def half_interval(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` values (Student's t)."""
    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    return t975.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (blocks, subtraction)."""
    return summarise_by(rows, ("blocks", "subtraction"))


def claim_table(summary: list[dict]) -> str:
    """Markdown: mean ± std over seeds."""
    lines = ["| blocks | content subtraction | palette match ↑ | texture match ↑ | text alignment ↑ "
             "| content leakage ↓ |", "|---|---|---|---|---|---|"]
    for s in summary:
        cells = " | ".join(f"{s[k]:.2f} ± {s[k + '_std']:.2f}" for k in SCORES)
        lines.append(f"| {s['blocks']} | {'yes' if s['subtraction'] else 'no'} | {cells} |")
    return "\n".join(lines) + "\n"


def verdict(summary: list[dict]) -> dict[str, bool]:
    """The paper's claims as checks on the means, for every block set other than all (no subtraction unless named)."""
    m = {(s["blocks"], s["subtraction"]): s for s in summary}
    all_, none = m[("all", False)], m[("none", False)]
    checks = {}
    for blocks in dict.fromkeys(s["blocks"] for s in summary):
        if blocks in ("all", "none"):
            continue
        sub = m[(blocks, False)]
        checks[f"{blocks}: transfers style (palette match above no adapter)"] = sub["palette_match"] > none["palette_match"]
        checks[f"{blocks}: leaks less content than all blocks"] = sub["content_leakage"] < all_["content_leakage"]
        checks[f"{blocks}: follows the prompt better than all blocks"] = sub["text_alignment"] > all_["text_alignment"]
    checks["subtraction lowers leakage of all-block injection"] = (m[("all", True)]["content_leakage"]
                                                                   < all_["content_leakage"])
    return checks


def tick_label(blocks: str, subtraction: bool, width: int = 14) -> str:
    """A condition's x-axis label: the block name broken at dots into short lines, then "−content"."""
    lines: list[str] = []
    for part in blocks.split("."):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "." + part
        else:
            lines.append(part if not lines else "." + part)
    return "\n".join(lines + (["−content"] if subtraction else []))


def claim_figure(summary: list[dict]):
    """Grouped bars per condition for the four scores (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [tick_label(s["blocks"], s["subtraction"]) for s in summary]
    fig, ax = plt.subplots(figsize=(max(9.0, 1.2 * len(summary) + 1), 4.5))
    width = 0.2
    for i, (k, colour) in enumerate(zip(SCORES, ("tab:purple", "tab:blue", "tab:green", "tab:red"))):
        xs = [x + (i - 1.5) * width for x in range(len(summary))]
        ax.bar(xs, [s[k] for s in summary], width, yerr=[s[k + "_std"] for s in summary], label=k, color=colour)
    # Horizontal, wrapped labels: rotated ones still collided for long block names.
    ax.set_xticks(range(len(summary)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of generated images")
    ax.set_title("Toy world: style vs. content by injected blocks (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    return fig


def claim_plot(summary: list[dict], path: Path) -> None:
    """Write the grouped bar chart to ``path``."""
    import matplotlib.pyplot as plt

    fig = claim_figure(summary)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run, then write claim.json, claim.md and claim.png."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="data_tools/toy_base")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300, help="adapter training steps (batch 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="adapter learning rate")
    p.add_argument("--refs", type=int, default=8, help="style references")
    p.add_argument("--per-ref", type=int, default=3, help="prompted shapes per reference")
    p.add_argument("--content-scale", type=float, default=1.0, help="λ when subtracting")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--block-sets", default=",".join(BLOCK_SETS),
                   help="comma list of presets or block names to train; must include all")
    args = p.parse_args(argv)
    block_sets = tuple(b.strip() for b in args.block_sets.split(",") if b.strip())
    if "all" not in block_sets:
        p.error("--block-sets must include all (the reference for leakage)")
    torch.set_num_threads(1)
    try:
        rows = run_claim(args.base, [int(s) for s in args.seeds.split(",")], steps=args.steps, num_refs=args.refs,
                         per_ref=args.per_ref, content_scale=args.content_scale, sample_steps=args.sample_steps,
                         block_sets=block_sets, lr=args.lr)
    except UnknownBlockError as error:
        p.error(str(error))
    summary, out = summarise(rows), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = verdict(summary)
    (out / "claim.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary,
                                                "checks": checks}, indent=2) + "\n")
    table = claim_table(summary) + "\n" + "\n".join(f"- {k}: {'yes' if v else 'NO'}" for k, v in checks.items())
    (out / "claim.md").write_text(table + "\n")
    claim_plot(summary, out / "claim.png")
    print(table)


if __name__ == "__main__":
    main()
