"""Build a tiny, deterministic SDXL-shaped base model (no download) for tests and the demo.

The UNet keeps SDXL's block structure (cross-attention in down blocks 1-2, the mid
block and up blocks 0-1; several transformer layers per attention) so that block
targeting means the same thing as on the real model, just with small widths.

    python -m data_tools.make_tiny_model --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from instantstyle.quiet import quiet_libraries

quiet_libraries()  # a command of its own: the filters go in before diffusers loads

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from instantstyle.generate import HelpFormatter as DefaultsFormatter

# Words that become single tokens; anything else falls back to characters.
TOKEN_WORDS = """
a an the of on in with and or by at to from over under
circle square triangle star cross ring diamond heart hexagon pentagon moon arrow dog cat house tree
red orange yellow green blue purple pink brown black white gray grey cyan magenta teal navy gold
dark light pale bright pastel neon warm cool muted vivid earthy monochrome sunset ocean forest
flat stripes striped dots dotted checker checkered grid noise noisy waves wavy plain solid
outlined outline thick thin stroke background texture pattern style painting image photo
""".split()

TEXT_HIDDEN = 32  # width of each text encoder; SDXL concatenates both -> cross_attention_dim
PROJECTION_DIM = 32  # text_encoder_2 and image encoder share this projected (content) space
TIME_EMBED_DIM = 8


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the base alphabet of its BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Merges learned by plain BPE until every word is one symbol.

    Learning them (rather than listing each word's chain) keeps them consistent, so
    encoding applies them back in rank order and reproduces whole words.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over bytes plus whole-word merges for TOKEN_WORDS."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _train_bpe(TOKEN_WORDS)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(vocab_size: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **extra,
    )


def build_tiny_unet() -> UNet2DConditionModel:
    """SDXL block layout (down 1-2, mid, up 0-1 with cross-attention) at toy widths."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def build_tiny_vae() -> AutoencoderKL:
    """Four-level VAE like SDXL's (8x downsampling, 4 latent channels)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.13025,
    )


def build_tiny_image_encoder() -> CLIPVisionModelWithProjection:
    """CLIP vision tower whose projection space equals text_encoder_2's (content subtraction)."""
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=32, projection_dim=PROJECTION_DIM,
    )
    return CLIPVisionModelWithProjection(config)


def build_tiny_scheduler() -> EulerDiscreteScheduler:
    """SDXL's scheduler settings."""
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """All components of the tiny base, deterministic from ``seed``, as a stock SDXL pipeline."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    unet = build_tiny_unet()
    vae = build_tiny_vae()
    text_encoder = CLIPTextModel(_text_config(vocab_size))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection_dim=PROJECTION_DIM))
    image_encoder = build_tiny_image_encoder()
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=build_tokenizer(), unet=unet.eval(),
        scheduler=build_tiny_scheduler(), image_encoder=image_encoder.eval(),
        feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """The module docstring as written, and each option's default."""


def save_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny base as a diffusers folder (plus ``image_encoder/``); returns the path.

    Written beside ``out`` and renamed into place, so an interrupted build (``model=tiny`` builds it in a
    cache on first use) never leaves a half-written base that later runs would take as complete.
    """
    from transformers.utils import logging as transformers_logging

    out = Path(out)
    pipe = build_tiny_pipeline(seed)
    target = out if out.exists() else out.with_name(f"{out.name}.tmp-{os.getpid()}")  # an existing folder: as before
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars for a few kB of weights
    try:
        pipe.save_pretrained(target, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    (target / "instantstyle_base.json").write_text(json.dumps({"name": "tiny", "seed": seed}, indent=2))
    if target != out:
        try:
            os.replace(target, out)
        except OSError:  # another process built it meanwhile: keep theirs
            shutil.rmtree(target, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_tiny_model",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = save_tiny_model(args.out, args.seed)
    print(f"tiny SDXL-shaped base written to {path}")


if __name__ == "__main__":
    main()
