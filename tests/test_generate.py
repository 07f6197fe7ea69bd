"""InstantStyle generation: content subtraction as computed by hand, batching, ControlNet, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from generate_support import STYLE, as_uint8, export_perturbed, style_image
from transformers import CLIPImageProcessor

from instantstyle.blocks import ALL_BLOCKS
from instantstyle.generate import StyleGenerator, main
from instantstyle.grid import make_grid
from instantstyle.pipeline import GenerationError, diffusers_scale_dict


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    return {"adapter": export_perturbed(tiny_model_dir, STYLE, tmp / "ip-adapter.safetensors"),
            "image": style_image(tmp / "style.png"), "tmp": tmp}


@pytest.fixture(scope="module")
def generator(tiny_model_dir, files):
    gen = StyleGenerator.from_pretrained(tiny_model_dir, files["adapter"])
    gen.pipe.set_progress_bar_config(disable=True)
    return gen


def capture_image_embeds(gen: StyleGenerator) -> list[torch.Tensor]:
    """Record the image embeddings the UNet's image projection receives at every step."""
    seen: list[torch.Tensor] = []
    gen.pipe.unet.encoder_hid_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].clone()))
    return seen


def hand_embeds(gen: StyleGenerator, image_path, content: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, text_embeds) straight from transformers, as the method defines them."""
    pixels = CLIPImageProcessor(size=224, crop_size=224)(Image.open(image_path).convert("RGB"),
                                                          return_tensors="pt").pixel_values
    ids = gen.pipe.tokenizer_2([content], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        return gen.pipe.image_encoder(pixels).image_embeds, gen.pipe.text_encoder_2(ids).text_embeds


@pytest.mark.parametrize("prompts", [["a red circle"], ["a red circle", "a blue square"]])
def test_content_subtraction_reaches_unet_with_several_images(generator, files, prompts):
    seen = capture_image_embeds(generator)
    images = generator.generate(files["image"], prompts, content_prompt="noise texture", content_scale=0.7,
                                num_images=3, steps=1)
    assert len(images) == 3 * len(prompts)
    image_embeds, text_embeds = hand_embeds(generator, files["image"], "noise texture", 0.7)
    embeds = seen[0][:, 0]  # (2 * prompts * images, D): unconditional half, then conditional
    half = 3 * len(prompts)
    assert embeds.shape == (2 * half, 32)
    assert torch.equal(embeds[:half], torch.zeros_like(embeds[:half]))
    expected = (image_embeds - 0.7 * text_embeds).expand(half, -1)
    torch.testing.assert_close(embeds[half:], expected, rtol=0, atol=1e-6)
    assert (text_embeds.abs().sum() > 0) and not torch.allclose(expected, image_embeds.expand(half, -1))


def test_precomputed_content_embedding_is_honoured(generator, files):
    seen = capture_image_embeds(generator)
    content = torch.randn(32, generator=torch.Generator().manual_seed(5))
    generator.generate(files["image"], "a cat", content_embeds=content, content_scale=2.0, num_images=2, steps=1)
    image_embeds, _ = hand_embeds(generator, files["image"], "", 1.0)
    torch.testing.assert_close(seen[0][2:, 0], (image_embeds - 2.0 * content).expand(2, -1), rtol=0, atol=1e-6)
    with pytest.raises(GenerationError, match="not both"):
        generator.generate(files["image"], "a cat", content_prompt="x", content_embeds=content, steps=1)


def test_content_scale_zero_and_scale_zero(generator, files):
    base = as_uint8(generator.generate(files["image"], "a cat", steps=2))
    same = as_uint8(generator.generate(files["image"], "a cat", content_prompt="dog", content_scale=0.0, steps=2))
    assert (base == same).all()
    off = as_uint8(generator.generate(files["image"], "a cat", scale=0.0, steps=2))
    assert abs(off - base).mean() > 2.0


def test_scale_dict_for_diffusers(generator):
    unet = generator.pipe.unet
    assert diffusers_scale_dict(unet, ["up_blocks.0.attentions.1"], 0.8) == {"up": {"block_0": [0.0, 0.8, 0.0]}}
    assert diffusers_scale_dict(unet, ["down_blocks.1", "mid_block"], 0.5) == {
        "down": {"block_1": [0.5, 0.5]}, "mid": 0.5}
    assert diffusers_scale_dict(unet, ALL_BLOCKS, 0.3) == 0.3


def test_controlnet_zero_init_matches_and_control_changes_image(tiny_model_dir, files, generator):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet)  # zero convolutions: no effect yet
    controlnet.save_pretrained(files["tmp"] / "controlnet")
    gen = StyleGenerator.from_pretrained(tiny_model_dir, files["adapter"], controlnet=str(files["tmp"] / "controlnet"))
    gen.pipe.set_progress_bar_config(disable=True)
    control = Image.new("RGB", (64, 64), (255, 255, 255))
    plain = as_uint8(generator.generate(files["image"], "a cat", steps=2))
    zero = as_uint8(gen.generate(files["image"], "a cat", steps=2, control_image=control))
    assert abs(zero - plain).max() <= 1
    with torch.no_grad():
        for conv in gen.pipe.controlnet.controlnet_down_blocks:
            conv.weight.normal_(0, 0.5)
    controlled = as_uint8(gen.generate(files["image"], "a cat", steps=2, control_image=control))
    assert abs(controlled - plain).mean() > 2.0
    with pytest.raises(GenerationError, match="control image"):
        gen.generate(files["image"], "a cat", steps=1)


def test_make_grid_places_images_row_major():
    tiles = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(tiles, rows=2, cols=3)
    assert grid.size == (12, 8)
    assert grid.getpixel((4, 0)) == (40, 0, 0) and grid.getpixel((0, 4)) == (120, 0, 0)
    assert grid.getpixel((8, 4)) == (255, 255, 255)


def cli(files, tiny_model_dir, **override) -> list[str]:
    args = {"--base": tiny_model_dir, "--adapter": str(files["adapter"]), "--style-image": str(files["image"]),
            "--prompt": "a cat", "--steps": "1", "--out": str(files["tmp"] / "out.png"), **override}
    return [x for k, v in args.items() for x in (k, v)]


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err


def test_cli_missing_style_image_subprocess(files, tiny_model_dir):
    argv = cli(files, tiny_model_dir, **{"--style-image": str(files["tmp"] / "nope.png")})
    proc = subprocess.run([sys.executable, "-m", "instantstyle.generate", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc.returncode, proc.stderr, "style image not found", "nope.png")


def test_cli_adapter_for_another_base_subprocess(files, tiny_model_dir):
    tensors = load_file(files["adapter"])
    tensors["ip_adapter.1.to_k_ip.weight"] = torch.zeros(32, 48)
    save_file(tensors, str(files["tmp"] / "other.safetensors"))
    argv = cli(files, tiny_model_dir, **{"--adapter": str(files["tmp"] / "other.safetensors")})
    proc = subprocess.run([sys.executable, "-m", "instantstyle.generate", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc.returncode, proc.stderr, "does not fit this base model", "ip_adapter.1.to_k_ip")


@pytest.mark.parametrize("override,needles", [
    ({"--style-image": "BAD"}, ("cannot read style image",)),
    ({"--blocks": "up_blocks.9"}, ("unknown block 'up_blocks.9'", "up_blocks.0.attentions.1")),
    ({"--adapter": "/nonexistent/a.safetensors"}, ("adapter file not found",)),
])
def test_cli_bad_inputs_one_line(files, tiny_model_dir, capsys, override, needles):
    if override.get("--style-image") == "BAD":
        (files["tmp"] / "bad.png").write_bytes(b"not an image")
        override = {"--style-image": str(files["tmp"] / "bad.png")}
    rc = main(cli(files, tiny_model_dir, **override))
    assert_one_line_error(rc, capsys.readouterr().err, *needles)


def test_cli_writes_grid_and_images(files, tiny_model_dir, capsys):
    rc = main(cli(files, tiny_model_dir, **{"--num-images": "2", "--content-prompt": "noise"}))
    assert rc == 0
    grid = Image.open(files["tmp"] / "out.png")
    first = Image.open(files["tmp"] / "out_0.png")
    assert grid.size == (128, 64) and first.size == (64, 64)
    assert (as_uint8([grid.crop((0, 0, 64, 64))]) == as_uint8([first])).all()


def test_cli_creates_the_folder_of_out_and_first_says_its_device(files, tiny_model_dir, capsys):
    out = files["tmp"] / "new" / "sub" / "out.png"
    assert main(cli(files, tiny_model_dir, **{"--out": str(out), "--device": "cpu"})) == 0
    assert Image.open(out).size == (64, 64)
    assert capsys.readouterr().out.startswith("device: cpu, ")  # with its torch thread count


def test_the_toy_base_is_found_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from instantstyle.models import locate_base

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert locate_base("data_tools/toy_base") == str(repo / "data_tools" / "toy_base")  # as model=toy finds it
    (tmp_path / "data_tools" / "toy_base").mkdir(parents=True)
    assert locate_base("data_tools/toy_base") == "data_tools/toy_base"  # a folder where you stand wins
    assert locate_base("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
