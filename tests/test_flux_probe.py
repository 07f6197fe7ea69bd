"""Block probing on the tiny FLUX base: one double block at a time, scored, and the CLI's FLUX path."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from generate_support import style_image
from test_flux import trained_adapter

from instantstyle.evaluate import EvalConfig, load_references
from instantstyle.flux_export import export_flux_safetensors
from instantstyle.flux_generate import FluxStyleGenerator
from instantstyle.probe_blocks import main, probe

CONFIG = EvalConfig(["a red circle"], [0], steps=2, guidance=3.5, height=64, width=64)


def save_tiny_clip(folder) -> str:
    """A tiny CLIP evaluator with both towers (projection 8), as --clip reads it."""
    from transformers import CLIPConfig, CLIPModel

    from data_tools.make_tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": len(tokenizer) - 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8)
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    from data_tools.make_tiny_flux import save_tiny_flux
    from instantstyle.metrics import ClipEmbedder

    tmp = tmp_path_factory.mktemp("flux_probe")
    base = str(save_tiny_flux(tmp / "base", seed=0))
    styles = tmp / "styles"
    styles.mkdir()
    style_image(styles / "a.png")
    (styles / "a.txt").write_text("a circle\n")
    pipe = FluxPipeline.from_pretrained(base)
    adapter = export_flux_safetensors(trained_adapter(pipe.transformer, blocks=(0, 1, 2)), pipe.transformer,
                                      tmp / "ip-adapter.safetensors")
    generator = FluxStyleGenerator.from_pretrained(base, adapter)
    clip = save_tiny_clip(tmp / "clip")
    report, samples = probe(generator, load_references(styles), CONFIG, embedder=ClipEmbedder.from_pretrained(clip))
    return {"tmp": tmp, "base": base, "styles": styles, "adapter": adapter, "clip": clip, "generator": generator,
            "report": report, "samples": samples}


def test_each_double_block_runs_alone(probed):
    settings = {s["name"]: s for s in probed["report"]["settings"]}
    blocks = ["double_blocks.0", "double_blocks.1", "double_blocks.2"]
    assert list(settings) == ["none", *blocks, "all"]
    assert settings["none"]["enabled_layers"] == []
    for index, block in enumerate(blocks):
        assert settings[block]["enabled_blocks"] == [block]
        assert settings[block]["enabled_layers"] == [f"transformer_blocks.{index}.attn.processor"]
    assert settings["all"]["enabled_blocks"] == blocks


def test_no_adapter_setting_is_exactly_the_base_and_blocks_differ(probed):
    images = {s["setting"]: torch.tensor(list(s["image"].getdata())) for s in probed["samples"]}
    plain = FluxPipeline.from_pretrained(probed["base"])(
        prompt=CONFIG.prompts, num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert torch.equal(images["none"], torch.tensor(list(plain.getdata())))
    assert not torch.equal(images["double_blocks.0"], images["double_blocks.2"])
    for s in probed["report"]["settings"]:
        assert all(isinstance(s["mean"][m], float) for m in ("style_similarity", "text_alignment", "content_leakage"))
    assert any(abs(s["delta"]["style_similarity"]) > 1e-6 for s in probed["report"]["settings"][1:])


def test_cli_probes_a_flux_adapter_with_a_clip_evaluator(probed, capsys):
    args = ["--base", probed["base"], "--adapter", str(probed["adapter"]), "--styles", str(probed["styles"]),
            "--prompts", "a square", "--steps", "1", "--guidance", "3.5"]
    assert main([*args, "--out", str(probed["tmp"] / "report"), "--clip", probed["clip"]]) == 0
    out = capsys.readouterr().out
    assert "| double_blocks.1 | 1 |" in out and (probed["tmp"] / "report" / "probe.json").is_file()
    assert main([*args, "--out", str(probed["tmp"] / "no-clip")]) == 2
    assert capsys.readouterr().err.startswith("error: FLUX bases have no CLIP text tower in the image space")
