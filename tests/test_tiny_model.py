"""The tiny base is SDXL-shaped, deterministic and loads in stock diffusers."""

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from data_tools.make_tiny_model import main as make_tiny_model
from instantstyle.blocks import block_names, cross_attention_layers


def test_stock_pipeline_loads_and_has_sdxl_block_structure(tiny_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    blocks = block_names(cross_attention_layers(pipe.unet.attn_processors))
    assert blocks == ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
                      "down_blocks.2.attentions.1", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                      "up_blocks.0.attentions.2", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                      "up_blocks.1.attentions.2", "mid_block.attentions.0"]
    assert pipe.image_encoder.config.projection_dim == pipe.text_encoder_2.config.projection_dim
    image = pipe("a circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_same_seed_same_weights(tmp_path, tiny_model_dir):
    make_tiny_model(["--out", str(tmp_path / "again")])
    a = load_file(f"{tiny_model_dir}/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again/unet/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_is_local_and_whole_words(tiny_model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    assert len(tok("a circle on a blue background").input_ids) == 8  # bos + 6 words + eos
