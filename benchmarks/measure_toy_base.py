"""Re-measure the toy base's card figures from the committed weights.

CLIP: image→caption and caption→image top-1 retrieval among batches of held-out samples,
and zero-shot shape accuracy ("a {shape}" prompts). VAE: reconstruction MSE and PSNR.
Classifier: held-out accuracy per head. UNet: prompt accuracy, i.e. the fraction of images
generated for "a {shape}" (fixed seeds) that the classifier labels as that shape, and the
same for palettes with "a {palette} {shape}".

    python -m benchmarks.measure_toy_base --base data_tools/toy_base [--write-card]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image
from tqdm import tqdm

from data_tools import synthetic
from benchmarks.shape_classifier import ShapeClassifier, accuracy, classify, load_classifier
from data_tools.toy_data import ToyData, render_dataset, to_clip, to_unit
from benchmarks.toy_train import tokenize

HELD_OUT_SEED = 10_000  # never used by pretraining (which renders seed 0, indices 0..num)
CARD_BEGIN, CARD_END = "<!-- figures:begin -->", "<!-- figures:end -->"


@torch.no_grad()
def clip_retrieval(pipe: StableDiffusionXLPipeline, data: ToyData, batch: int = 64) -> dict[str, float]:
    """Top-1 retrieval both ways within batches; a retrieved caption counts if its text is the true one."""
    hits_i2t = hits_t2i = 0
    for start in range(0, len(data) - batch + 1, batch):
        idx = slice(start, start + batch)
        img = F.normalize(pipe.image_encoder(to_clip(data.images[idx])).image_embeds, dim=-1)
        txt = F.normalize(pipe.text_encoder_2(tokenize(pipe.tokenizer_2, data.captions[idx])).text_embeds, dim=-1)
        sims, captions = img @ txt.T, data.captions[idx]
        hits_i2t += sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(dim=1).tolist()))
        hits_t2i += sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(dim=0).tolist()))
    total = (len(data) // batch) * batch
    return {"image_to_text_top1": hits_i2t / total, "text_to_image_top1": hits_t2i / total, "batch": batch}


@torch.no_grad()
def clip_zero_shot_shape(pipe: StableDiffusionXLPipeline, data: ToyData) -> float:
    """Accuracy of picking the right "a {shape}" prompt for each image."""
    txt = F.normalize(pipe.text_encoder_2(tokenize(pipe.tokenizer_2, [f"a {s}" for s in synthetic.SHAPES])).text_embeds,
                      dim=-1)
    img = F.normalize(pipe.image_encoder(to_clip(data.images)).image_embeds, dim=-1)
    return float(((img @ txt.T).argmax(dim=1) == data.shapes).float().mean())


@torch.no_grad()
def vae_reconstruction(vae: AutoencoderKL, data: ToyData) -> dict[str, float]:
    """MSE of pixels in [0, 1] (latent mean decoded) and the PSNR it implies."""
    x = to_unit(data.images)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 128]).latent_dist.mean).sample for i in range(0, len(x), 128)])
    mse = float(F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / mse)}


def generate(pipe: StableDiffusionXLPipeline, prompts: list[str], seed: int = 0, steps: int = 20,
             guidance: float = 5.0) -> list[Image.Image]:
    """One image per prompt; image i uses seed ``seed + i``, so results do not depend on batching."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return list(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images)


def prompt_accuracy(pipe: StableDiffusionXLPipeline, classifier: ShapeClassifier, per_shape: int = 4,
                    seed: int = 0, steps: int = 20, guidance: float = 5.0) -> dict:
    """Fraction of "a {shape}" images classified as that shape (per shape and overall)."""
    prompts = [f"a {s}" for s in synthetic.SHAPES for _ in range(per_shape)]
    predicted = []
    for start in tqdm(range(0, len(prompts), 8), desc="prompt accuracy", unit="batch"):
        images = generate(pipe, prompts[start:start + 8], seed + start, steps, guidance)
        predicted += classify(classifier, images)["shape"]
    truth = [p.removeprefix("a ") for p in prompts]
    per = {s: sum(p == t == s for p, t in zip(predicted, truth)) / per_shape for s in synthetic.SHAPES}
    return {"accuracy": sum(p == t for p, t in zip(predicted, truth)) / len(truth), "per_shape": per,
            "images": len(truth), "steps": steps, "guidance": guidance, "seed": seed}


def palette_accuracy(pipe: StableDiffusionXLPipeline, classifier: ShapeClassifier, per_palette: int = 2,
                     seed: int = 100, steps: int = 20, guidance: float = 5.0) -> float:
    """Fraction of "a {palette} {shape}" images whose classified palette is the prompted one."""
    palettes = list(synthetic.PALETTES)
    pairs = [(p, synthetic.SHAPES[(i + k) % len(synthetic.SHAPES)]) for i, p in enumerate(palettes)
             for k in range(per_palette)]
    images = generate(pipe, [f"a {p} {s}" for p, s in pairs], seed, steps, guidance)
    return sum(a == p for a, (p, _) in zip(classify(classifier, images)["palette"], pairs)) / len(pairs)


def measure(base: str | Path, held_out: int = 1024, per_shape: int = 4) -> dict:
    """Every card figure of the base folder (with its ``classifier/``)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(Path(base) / "classifier")
    data = render_dataset(held_out, 64, HELD_OUT_SEED, desc="held-out")
    return {
        "clip": {**clip_retrieval(pipe, data), "zero_shot_shape": clip_zero_shot_shape(pipe, data)},
        "vae": vae_reconstruction(pipe.vae, data),
        "classifier": accuracy(classifier, data),
        "unet": {**prompt_accuracy(pipe, classifier, per_shape), "palette_accuracy": palette_accuracy(pipe, classifier)},
        "held_out_images": held_out,
    }


def figures_table(m: dict) -> str:
    """The card's Markdown table of figures."""
    c, v, k, u = m["clip"], m["vae"], m["classifier"], m["unet"]
    rows = [
        ("CLIP image→caption top-1 (batch of 64)", f"{c['image_to_text_top1']:.1%}", "1.6%"),
        ("CLIP caption→image top-1 (batch of 64)", f"{c['text_to_image_top1']:.1%}", "1.6%"),
        ("CLIP zero-shot shape ('a {shape}')", f"{c['zero_shot_shape']:.1%}", "12.5%"),
        ("VAE reconstruction MSE (pixels in [0,1])", f"{v['mse']:.5f}", "–"),
        ("VAE reconstruction PSNR", f"{v['psnr_db']:.1f} dB", "–"),
        ("classifier shape / palette / texture (renders)",
         f"{k['shape']:.1%} / {k['palette']:.1%} / {k['texture']:.1%}", "12.5% / 12.5% / 16.7%"),
        (f"UNet prompt accuracy ('a {{shape}}', {u['images']} images, {u['steps']} steps, CFG {u['guidance']:g})",
         f"{u['accuracy']:.1%}", "12.5%"),
        ("UNet palette accuracy ('a {palette} {shape}')", f"{u['palette_accuracy']:.1%}", "12.5%"),
    ]
    lines = ["| figure | value | chance |", "|---|---|---|"] + [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    per = ", ".join(f"{s} {a:.0%}" for s, a in u["per_shape"].items())
    return "\n".join(lines) + f"\n\nPer shape: {per}. Held-out images: {m['held_out_images']} (seed {HELD_OUT_SEED}).\n"


def write_card_figures(card: Path, table: str) -> None:
    """Replace the text between the figure markers of CARD.md (append the section if absent)."""
    text = card.read_text() if card.is_file() else ""
    block = f"{CARD_BEGIN}\n{table}{CARD_END}"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + block + rest.split(CARD_END, 1)[1]
    else:
        text += f"\n## Figures\n\n{block}\n"
    card.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table, save ``figures.json`` (and the card section with --write-card)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="data_tools/toy_base")
    parser.add_argument("--held-out", type=int, default=1024)
    parser.add_argument("--per-shape", type=int, default=4, help="generated images per shape")
    parser.add_argument("--write-card", action="store_true", help="update BASE/CARD.md and BASE/figures.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    figures = measure(args.base, args.held_out, args.per_shape)
    table = figures_table(figures)
    print(table, end="")
    if args.write_card:
        (Path(args.base) / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
        write_card_figures(Path(args.base) / "CARD.md", table)


if __name__ == "__main__":
    main()
