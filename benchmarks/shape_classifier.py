"""A small CNN that reads the synthetic world's ground truth back from an image.

Three heads: the object's shape (text alignment / content leakage), its palette and its
fill texture (style). Trained on freshly rendered 64 px images with blur and noise, so it
also reads the softer images a diffusion model produces. It is the judge of the toy base's
prompt accuracy and of the claim measurement, never trained on generated images.

    python -m benchmarks.shape_classifier --out DIR [--num 12000 --steps 1500 --seed 1]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from data_tools import synthetic
from data_tools.toy_data import ToyData, render_dataset, to_unit

HEADS: dict[str, list[str]] = {
    "shape": list(synthetic.SHAPES), "palette": list(synthetic.PALETTES), "texture": list(synthetic.TEXTURES),
}


class ShapeClassifier(nn.Module):
    """Four conv stages (64 → 4 px) and one linear head per attribute."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 3 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1], len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images in [-1, 1], (N, 3, 64, 64)."""
        pooled = self.features(images).mean(dim=(2, 3))
        return {name: head(pooled) for name, head in self.heads.items()}


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur half the batch and add noise: generated images are softer and grainier than renders."""
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(images), 1, 1, 1, generator=g) < 0.5).float()
    sigma = 0.08 * torch.rand(len(images), 1, 1, 1, generator=g)
    return (pick * blurred + (1 - pick) * images + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)


def train_classifier(data: ToyData, steps: int, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 1) -> ShapeClassifier:
    """Cross-entropy on all three heads."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    labels = {"shape": data.shapes, "palette": data.palettes, "texture": data.textures}
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="classifier", unit="step")
    for step in bar:
        idx = torch.randint(len(data), (batch_size,), generator=g)
        logits = model(augment(to_unit(data.images[idx]), g))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        for group in optimizer.param_groups:  # linear decay: a settled model at any step budget
            group["lr"] = lr * (1 - step / steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval().requires_grad_(False)


def save_classifier(model: ShapeClassifier, out: str | Path, info: dict | None = None) -> Path:
    """``out/model.safetensors`` + ``out/config.json`` (label names, how it was trained)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"heads": HEADS, **(info or {})}, indent=2) + "\n")
    return out


def load_classifier(path: str | Path) -> ShapeClassifier:
    """Load a classifier saved by ``save_classifier``."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no classifier at {path}: run python -m benchmarks.shape_classifier --out {path}")
    model = ShapeClassifier()
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval().requires_grad_(False)


def images_to_tensor(images: list[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images → (N, 3, size, size) in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images]
    return to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


@torch.no_grad()
def classify(model: ShapeClassifier, images: list[Image.Image] | torch.Tensor) -> dict[str, list[str]]:
    """Predicted label names per head (tensors are taken as [-1, 1] images)."""
    x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    logits = model(x)
    return {k: [HEADS[k][i] for i in logits[k].argmax(dim=1).tolist()] for k in HEADS}


@torch.no_grad()
def accuracy(model: ShapeClassifier, data: ToyData) -> dict[str, float]:
    """Per-head accuracy on rendered images."""
    logits = model(to_unit(data.images))
    labels = {"shape": data.shapes, "palette": data.palettes, "texture": data.textures}
    return {k: float((logits[k].argmax(dim=1) == labels[k]).float().mean()) for k in HEADS}


def train_judge(out: str | Path, num: int = 12000, steps: int = 1500, seed: int = 1) -> dict[str, float]:
    """Train on fresh renders (seed ``seed``), save to ``out``; returns held-out accuracy per head."""
    model = train_classifier(render_dataset(num, seed=seed), steps, seed=seed)
    held_out = accuracy(model, render_dataset(1000, seed=seed + 1000, desc="held-out"))
    save_classifier(model, out, {"seed": seed, "num": num, "steps": steps, "held_out": held_out})
    return held_out


def main(argv: list[str] | None = None) -> None:
    """Train on fresh renders, report held-out accuracy, save."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=12000, help="training renders")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pretrain_toy_base's default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train_judge(args.out, args.num, args.steps, args.seed)))


if __name__ == "__main__":
    main()


def ground_truth_scores(classifier: ShapeClassifier, images: Sequence[Image.Image], reference: dict,
                        prompt_shape: str) -> dict[str, float]:
    """Exact-attribute metrics: palette/texture of the reference, prompted shape, reference's shape."""
    labels = classify(classifier, list(images))
    n = len(images)
    return {
        "palette_match": sum(p == reference["palette"] for p in labels["palette"]) / n,
        "texture_match": sum(t == reference["texture"] for t in labels["texture"]) / n,
        "text_alignment": sum(s == prompt_shape for s in labels["shape"]) / n,
        "content_leakage": sum(s == reference["shape"] for s in labels["shape"]) / n,
    }


@torch.no_grad()
def palette_probability(classifier: ShapeClassifier, images: Sequence[Image.Image], palette: str) -> float:
    """Mean classifier probability of ``palette``: a smooth style score for small samples."""
    probs = classifier(images_to_tensor(list(images)))["palette"].softmax(dim=1)
    return float(probs[:, HEADS["palette"].index(palette)].mean())
