"""Build a tiny, deterministic FLUX.1-shaped base model (no download) for tests.

The transformer keeps FLUX.1-dev's structure (double-stream blocks, then single-stream
blocks, guidance embedding, 2x2-packed 16-channel latents, 3-axis RoPE) at toy widths;
the text side is a tiny CLIP text model (pooled vector) and a tiny T5 encoder
(sequence), with tokenizers built from a local vocabulary. The folder also holds the
image encoder and feature extractor, so ``FluxPipeline.from_pretrained(DIR)`` loads
everything an IP-Adapter needs, offline.

    python -m data_tools.make_tiny_flux --out DIR
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

from instantstyle.quiet import quiet_libraries

quiet_libraries()  # a command of its own: the filters go in before diffusers loads

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from transformers import T5TokenizerFast

from .make_tiny_model import TOKEN_WORDS, build_tiny_image_encoder, build_tokenizer

TEXT_HIDDEN = 32  # CLIP text width = pooled_projection_dim of the transformer
# T5 width = joint_attention_dim (also the width of IP-Adapter image tokens); unlike the
# transformer's width (32), as on the real model (4096 vs 3072), so mixing them up fails.
T5_HIDDEN = 48
LATENT_CHANNELS = 16  # FLUX's VAE; the transformer sees 2x2 patches -> 64 input channels


def build_t5_tokenizer() -> T5TokenizerFast:
    """A unigram tokenizer: whole words for TOKEN_WORDS, single characters for anything else."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0) for word in dict.fromkeys(TOKEN_WORDS)]
    vocab += [("\u2581", -5.0)] + [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_flux_transformer() -> FluxTransformer2DModel:
    """FLUX.1-dev's layout (3 double + 2 single blocks, guidance embedding) at width 32 (2 heads of 16)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=3, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def build_tiny_flux_vae() -> AutoencoderKL:
    """Four-level VAE (8x downsampling) with FLUX's 16 latent channels and shift/scale factors."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler settings (resolution-dependent shift of the sigmas)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _tiny_text_encoders(clip_vocab: int, t5_vocab: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=clip_vocab - 2,
        eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    ))
    return clip, t5


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """All components of the tiny FLUX base, deterministic from ``seed``, as a stock FluxPipeline."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    text_encoder, text_encoder_2 = _tiny_text_encoders(len(tokenizer), len(tokenizer_2))
    return FluxPipeline(
        scheduler=build_flux_scheduler(), vae=build_tiny_flux_vae().eval(), text_encoder=text_encoder.eval(),
        tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
        transformer=build_tiny_flux_transformer().eval(), image_encoder=build_tiny_image_encoder().eval(),
        feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
    )


def save_tiny_flux(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny FLUX base as a diffusers folder (with ``image_encoder/``); returns the path."""
    out = Path(out)
    build_tiny_flux_pipeline(seed).save_pretrained(out, safe_serialization=True)
    (out / "instantstyle_base.json").write_text(json.dumps({"name": "tiny_flux", "seed": seed}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_tiny_flux",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the pipeline into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"tiny FLUX-shaped base written to {save_tiny_flux(args.out, args.seed)}")


if __name__ == "__main__":
    main()
