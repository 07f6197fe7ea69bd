"""Pretrain the toy base: a small but real SDXL-shaped model of the synthetic world, on a CPU.

Stages, in order, each a fixed number of steps from its own seed (deterministic at a fixed
thread count): render the dataset → CLIP towers (contrastive, captions name content and
style) → VAE → UNet (text to image, with caption dropout for classifier-free guidance);
then the classifier that judges it (``DIR/classifier``, trained on its own renders). Writes
a stock diffusers folder in ``make_tiny_model``'s layout; ``instantstyle_base.json`` records
the settings and per-stage seconds.

    python -m benchmarks.pretrain_toy_base --out DIR [--seed 0] [--unet-steps 6500]
    python -m benchmarks.measure_toy_base --base DIR        # the card's figures
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from benchmarks import toy_models
from benchmarks.shape_classifier import train_judge
from data_tools.toy_data import render_dataset
from benchmarks.toy_train import Budget, encode_captions, encode_latents, tokenize, train_clip, train_unet, train_vae


def build_parser() -> argparse.ArgumentParser:
    """Flags: output, seed, dataset size and every stage's step budget."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=20000, help="synthetic training images (64 px)")
    p.add_argument("--clip-steps", type=int, default=600)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--classifier-steps", type=int, default=1500, help="the judge (shape_classifier)")
    p.add_argument("--classifier-num", type=int, default=12000, help="renders the judge learns from")
    p.add_argument("--unet-steps", type=int, default=6500)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are bitwise fixed per count)")
    return p


def budgets(args: argparse.Namespace) -> dict[str, Budget]:
    """Batch sizes and learning rates tuned on this machine; only the step counts are flags."""
    return {"clip": Budget(args.clip_steps, 96, 1e-3), "vae": Budget(args.vae_steps, 16, 1e-3),
            "classifier": Budget(args.classifier_steps, 64, 2e-3), "unet": Budget(args.unet_steps, 32, 1e-3)}


def pretrain(args: argparse.Namespace) -> dict:
    """Run every stage and save; returns the settings and per-stage seconds."""
    torch.set_num_threads(args.threads)
    plan, seconds = budgets(args), {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    data = render_dataset(args.num, toy_models.IMAGE_SIZE, args.seed)
    tokenizer = toy_models.build_toy_tokenizer()
    lap("render")
    text_encoder_2, image_encoder = train_clip(data, tokenizer, plan["clip"], args.seed + 1)
    lap("clip")
    vae = train_vae(data, plan["vae"], args.seed + 2)
    lap("vae")
    latents = encode_latents(vae, data.images)
    prompt_embeds, pooled = encode_captions(text_encoder_2, tokenize(tokenizer, data.captions))
    unet = train_unet(latents, prompt_embeds, pooled, plan["unet"], args.seed + 4)
    lap("unet")
    info = {"name": "toy", "seed": args.seed, "num_images": args.num, "resolution": toy_models.IMAGE_SIZE,
            "clip_image_size": toy_models.IMAGE_SIZE, "threads": args.threads,
            "budgets": {k: asdict(v) for k, v in plan.items()},
            "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)}
    out = toy_models.save_toy_base(args.out, unet=unet, vae=vae, text_encoder_2=text_encoder_2,
                                   image_encoder=image_encoder, info=info)
    # The judge of prompt accuracy learns from its own renders, never from the base's data or outputs.
    info["classifier_held_out"] = train_judge(out / "classifier", args.classifier_num, args.classifier_steps)
    lap("classifier")
    info["seconds"], info["total_seconds"] = seconds, round(sum(seconds.values()), 1)
    (out / "instantstyle_base.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    args = build_parser().parse_args(argv)
    info = pretrain(args)
    print(f"toy base written to {args.out} in {info['total_seconds']:.0f} s: {json.dumps(info['seconds'])}")


if __name__ == "__main__":
    main()
