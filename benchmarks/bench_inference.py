"""Seconds per generated image: no adapter vs image branch in the style block only vs in every block.

    python -m benchmarks.bench_inference [--base DIR --adapter FILE --steps 10 --repeats 5]

Without ``--base`` it builds the tiny model in a temporary folder and exports a random
adapter trained on every block (so "all blocks" really computes an image branch everywhere).
All settings run in one process with the same steps, size, prompt and seed; settings alternate
within each repeat and the median is reported, after one untimed warm-up each.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)

import torch
from PIL import Image

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.blocks import ALL_BLOCKS
from instantstyle.export import export_safetensors
from instantstyle.generate import StyleGenerator
from instantstyle.models import load_base
from instantstyle.pipeline import load_pipeline


def tiny_setup(folder: Path) -> tuple[str, Path]:
    """Tiny base plus a randomly perturbed all-blocks adapter, written under ``folder``."""
    from data_tools.make_tiny_model import save_tiny_model

    base_dir = str(save_tiny_model(folder / "base", seed=0))
    base = load_base(base_dir)
    torch.manual_seed(0)
    adapter = install_adapter(base.unet, AdapterSpec(blocks=ALL_BLOCKS, image_embed_dim=base.image_encoder.config.projection_dim))
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return base_dir, export_safetensors(adapter, base.unet, folder / "ip-adapter.safetensors")


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per run; runs alternate so that machine load drifts hit all of them alike."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark(base: str, adapter: Path, *, steps: int, size: int | None, repeats: int,
              device: str) -> dict[str, float]:
    """Seconds per image for each setting (one prompt, one image, guidance on)."""
    style = Image.new("RGB", (224, 224), (180, 60, 40))
    plain = load_pipeline(base, device=device)
    generator = StyleGenerator.from_pretrained(base, adapter, device=device)
    for pipe in (plain, generator.pipe):
        pipe.set_progress_bar_config(disable=True)
    runs = {
        "no adapter": lambda: plain(prompt="a house", num_inference_steps=steps, height=size, width=size,
                                    generator=torch.Generator("cpu").manual_seed(0)),
        "style block only": lambda: generator.generate(style, "a house", blocks="style", steps=steps,
                                                       height=size, width=size),
        "all blocks": lambda: generator.generate(style, "a house", blocks="all", steps=steps,
                                                 height=size, width=size),
    }
    return interleaved_medians(runs, repeats)


def table(results: dict[str, float], steps: int, size: int | None, device: str) -> str:
    """Markdown table with the overhead relative to no adapter."""
    plain = results["no adapter"]
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    lines = [f"device {device}{threads}, {steps} steps, {size or 'default'} px, 1 image per call, median",
             "", "| setting | s / image | overhead vs no adapter |", "|---|---|---|"]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds:.3f} | {100 * (seconds / plain - 1):+.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="SDXL folder (default: the tiny model, built in a temp folder)")
    parser.add_argument("--adapter", help="adapter file for --base")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.base) != bool(args.adapter):
        parser.error("--base and --adapter go together")
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = (args.base, Path(args.adapter)) if args.base else tiny_setup(Path(tmp))
        results = benchmark(base, adapter, steps=args.steps, size=args.size, repeats=args.repeats,
                            device=args.device)
    print(table(results, args.steps, args.size, args.device))


if __name__ == "__main__":
    main()
