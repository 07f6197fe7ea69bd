"""Architectures of the pretrained toy base: SDXL's parts at 64×64 pixels and small widths.

Same folder layout as ``make_tiny_model`` (a stock ``StableDiffusionXLPipeline`` plus
``image_encoder/`` and ``feature_extractor/``), but sized so that every part can be
trained on a CPU in minutes: the VAE downsamples 4× (64 px → 16×16×4 latents), the
CLIP towers see 64 px images in 8 px patches, and the UNet keeps SDXL's block layout.
"""

from __future__ import annotations

import json
from pathlib import Path

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

from data_tools import synthetic
from data_tools.make_tiny_model import TOKEN_WORDS, _bytes_to_unicode, _train_bpe, build_tiny_scheduler

IMAGE_SIZE = 64  # pixels, for the UNet/VAE and the image encoder alike
LATENT_SIZE = 16  # the VAE downsamples 4×
TEXT_HIDDEN = 64  # each text encoder; SDXL concatenates both → cross_attention_dim 128
PROJECTION_DIM = 64  # shared CLIP space of text_encoder_2 and the image encoder
TIME_EMBED_DIM = 8
# Where the trained toy UNet keeps style, found by instantstyle.probe_blocks on an all-block adapter
# (docs/toy_world.md, "Which blocks carry style?"); SDXL's up_blocks.0.attentions.1 is a 4x4 layer here.
# configs/experiment/demo.yaml trains it (tests keep the two equal).
STYLE_BLOCK = "up_blocks.1.attentions.2"
MAX_TOKENS = 77


def vocabulary_words() -> list[str]:
    """Every word a synthetic caption can contain, plus the tiny model's words."""
    words = list(synthetic.SHAPES) + list(synthetic.PALETTES) + list(synthetic.STROKE_COLOURS)
    words += list(synthetic.BACKGROUND_COLOURS) + ["gradient", "polka", "pattern", "grainy", "outlined"]
    for phrase in list(synthetic._TEXTURE_PHRASES.values()) + list(synthetic._BACKGROUND_ADJECTIVES.values()):
        words += phrase.split()
    return list(dict.fromkeys(TOKEN_WORDS + words))


def build_toy_tokenizer() -> CLIPTokenizer:
    """CLIP BPE over bytes with whole-word merges for every synthetic caption word."""
    alphabet = list(_bytes_to_unicode().values())
    merges = _train_bpe(vocabulary_words())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def text_config(vocab_size: int) -> CLIPTextConfig:
    """Both text towers share this config (text_encoder is text_encoder_2 without its projection)."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=PROJECTION_DIM,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def build_text_encoder_2(vocab_size: int) -> CLIPTextModelWithProjection:
    """The CLIP text tower whose pooled, projected output is the content embedding."""
    return CLIPTextModelWithProjection(text_config(vocab_size))


def build_image_encoder() -> CLIPVisionModelWithProjection:
    """The CLIP vision tower with projection (the IP-Adapter image encoder)."""
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=PROJECTION_DIM,
    )
    return CLIPVisionModelWithProjection(config)


def build_feature_extractor() -> CLIPImageProcessor:
    """CLIP preprocessing at the image encoder's 64 px (OpenAI CLIP mean/std)."""
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    """Three-level VAE: 64×64×3 → 16×16×4."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, scaling_factor=scaling_factor,
    )


def build_unet() -> UNet2DConditionModel:
    """SDXL block layout (cross-attention in down 1-2, mid, up 0-1) on 16×16 latents."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(4, 8, 8), norm_num_groups=8, cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """SDXL's noise schedule with v-prediction (training uses the same betas through DDPM).

    ε-prediction weighs the high-noise steps, where a 16×16 latent's silhouette is decided,
    by their tiny SNR; v-prediction weighs them by SNR + 1, and in our runs drew objects sooner.
    """
    return EulerDiscreteScheduler.from_config(build_tiny_scheduler().config, prediction_type="v_prediction")


def text_encoder_from(text_encoder_2: CLIPTextModelWithProjection) -> CLIPTextModel:
    """SDXL's first text tower: here the same trained CLIP text weights, without the projection."""
    encoder = CLIPTextModel(text_encoder_2.config)
    encoder.load_state_dict(text_encoder_2.text_model.state_dict())
    return encoder.eval()


def save_toy_base(out: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                  text_encoder_2: CLIPTextModelWithProjection, image_encoder: CLIPVisionModelWithProjection,
                  info: dict) -> Path:
    """Write the stock pipeline folder (+ ``instantstyle_base.json`` describing it)."""
    out = Path(out)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder_from(text_encoder_2), text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_toy_tokenizer(), tokenizer_2=build_toy_tokenizer(), unet=unet.eval(),
        scheduler=build_scheduler(), image_encoder=image_encoder.eval(), feature_extractor=build_feature_extractor(),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "instantstyle_base.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out
