"""Evaluation: metric values against hand-computed cosines, report files, settings, CLI errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from generate_support import STYLE, export_perturbed, style_image

from instantstyle.evaluate import (
    EvalConfig,
    EvalSetting,
    evaluate_adapter,
    evaluate_settings,
    load_references,
    main,
    parse_settings,
)
from instantstyle.generate import StyleGenerator
from instantstyle.metrics import (
    ClipEmbedder,
    content_leakage,
    mean_metrics,
    paired_cosine,
    style_similarity,
    text_alignment,
)


def test_cosines_match_hand_computation():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(paired_cosine(a[:2], b), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(style_similarity(a, b[1:]), torch.tensor([r, 1.0, 7 / (5 * math.sqrt(2))]))
    torch.testing.assert_close(text_alignment(a[2:], torch.tensor([[-3.0, -4.0]])), torch.tensor([-1.0]))
    torch.testing.assert_close(content_leakage(a[:1], torch.tensor([[0.0, 5.0]])), torch.tensor([0.0]))
    means = mean_metrics([{"style_similarity": 0.5, "text_alignment": 0.1, "content_leakage": None},
                          {"style_similarity": 0.7, "text_alignment": 0.3, "content_leakage": 0.2}])
    assert means == pytest.approx({"style_similarity": 0.6, "text_alignment": 0.2, "content_leakage": 0.2})


class ColourEmbedder:
    """Embeds an image as its mean RGB and a text by a fixed table: metrics become hand-checkable."""

    TEXTS = {"a red circle": [1.0, 0.0, 0.0], "a cat": [0.0, 1.0, 0.0], "noise texture": [1.0, 1.0, 1.0],
             "flat red": [1.0, 0.2, 0.2]}

    def embed_images(self, images):
        return torch.tensor(np.stack([np.asarray(i.convert("RGB"), dtype=np.float64).mean((0, 1)) for i in images]))

    def embed_texts(self, texts):
        return torch.tensor([self.TEXTS[t] for t in texts], dtype=torch.float64)


def hand_cosine(u, v) -> float:
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    styles = tmp / "styles"
    styles.mkdir()
    style_image(styles / "a.png")
    (styles / "a.txt").write_text("noise texture\n")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(styles / "b.png")
    (tmp / "captions.json").write_text(json.dumps({"b": "flat red"}))
    (tmp / "prompts.txt").write_text("a red circle\n\n# skipped\na cat\n")
    adapter = export_perturbed(tiny_model_dir, STYLE, tmp / "ip-adapter.safetensors")
    generator = StyleGenerator.from_pretrained(tiny_model_dir, adapter)
    return {"tmp": tmp, "styles": styles, "adapter": adapter, "generator": generator}


def test_report_metrics_equal_hand_cosines(setup):
    refs = load_references(setup["styles"], setup["tmp"] / "captions.json")
    assert [(r.name, r.caption) for r in refs] == [("a", "noise texture"), ("b", "flat red")]
    settings = [EvalSetting("plain"), EvalSetting("subtract", blocks="style", content_scale=1.0)]
    config = EvalConfig(["a red circle", "a cat"], seeds=[0], steps=1, cell=32)
    out = setup["tmp"] / "report"
    report = evaluate_settings(setup["generator"], refs, settings, config, out, ColourEmbedder())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [s["num_samples"] for s in saved["settings"]] == [4, 4]
    # Regenerate one sample and score it by hand.
    image = setup["generator"].generate(refs[1].image, config.prompts, content_prompt="flat red", content_scale=1.0,
                                        blocks="style", seed=0, steps=1)[1]
    colour = ColourEmbedder().embed_images([image])[0]
    sample = next(s for s in saved["settings"][1]["samples"] if s["style"] == "b" and s["prompt"] == "a cat")
    assert sample["style_similarity"] == pytest.approx(hand_cosine(colour, [200, 30, 30]), abs=1e-6)
    assert sample["text_alignment"] == pytest.approx(hand_cosine(colour, [0, 1, 0]), abs=1e-6)
    assert sample["content_leakage"] == pytest.approx(hand_cosine(colour, [1, 0.2, 0.2]), abs=1e-6)
    plain = saved["settings"][0]
    assert plain["mean"]["text_alignment"] == pytest.approx(
        np.mean([s["text_alignment"] for s in plain["samples"]]))
    table = (out / "metrics.md").read_text().strip().splitlines()
    assert len(table) == 6 and table[2].startswith("| plain |") and "| 4 |" in table[3]
    assert table[4].startswith("| baseline: noise images | – | – | – |")
    assert table[5].startswith("| baseline: another style's reference | – | – | – |")
    grid = Image.open(out / "grid.png")
    # columns: reference + 2 prompts; rows: 2 settings x 2 styles; plus the header row and the label column
    assert grid.width > 3 * 32 and grid.height > 4 * 32


def test_evaluate_adapter_returns_means_with_base_encoders(setup):
    refs = load_references(setup["styles"])
    assert refs[1].caption is None  # no sidecar and no mapping
    config = EvalConfig(["a cat"], seeds=[3], steps=1)
    means = evaluate_adapter(setup["generator"], refs, config)
    embedder = ClipEmbedder.from_pipeline(setup["generator"].pipe)
    images = [setup["generator"].generate(r.image, "a cat", seed=3, steps=1)[0] for r in refs]
    style = style_similarity(embedder.embed_images(images), embedder.embed_images([r.image for r in refs]))
    assert means["style_similarity"] == pytest.approx(float(style.mean()), abs=1e-6)
    leak = content_leakage(embedder.embed_images(images[:1]), embedder.embed_texts(["noise texture"]))
    assert means["content_leakage"] == pytest.approx(float(leak[0]), abs=1e-6)  # only "a" has a caption


def test_parse_settings_product():
    settings = parse_settings(["style", "all"], "1.0", "0,0.5")
    assert [(s.blocks, s.content_scale) for s in settings] == [("style", 0.0), ("style", 0.5), ("all", 0.0),
                                                               ("all", 0.5)]
    assert len({s.name for s in settings}) == 4


def test_evaluator_folder_loads_trained_towers(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from data_tools.make_tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": len(tokenizer) - 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    embedder = ClipEmbedder.from_pretrained(tmp_path)
    ids = CLIPTokenizer.from_pretrained(tmp_path)(["a cat"], padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = model.text_model(ids).pooler_output
        expected = model.text_projection(pooled)
    torch.testing.assert_close(embedder.embed_texts(["a cat"]), expected)
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    pixels = embedder.processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected_image = model.visual_projection(model.vision_model(pixels).pooler_output)
    torch.testing.assert_close(embedder.embed_images([image]), expected_image)


@pytest.mark.parametrize("override,needle", [
    ({"--styles": "MISSING"}, "style folder not found"),
    ({"--blocks": "up_blocks.7"}, "unknown block 'up_blocks.7'"),
    ({"--content-scale": "1"}, "has no caption"),
])
def test_cli_errors_are_one_line(setup, tiny_model_dir, capsys, override, needle):
    args = {"--base": tiny_model_dir, "--adapter": str(setup["adapter"]), "--styles": str(setup["styles"]),
            "--prompts": str(setup["tmp"] / "prompts.txt"), "--out": str(setup["tmp"] / "cli"), "--steps": "1",
            **override}
    if args["--styles"] == "MISSING":
        args["--styles"] = str(setup["tmp"] / "missing")
    rc = main([x for kv in args.items() for x in kv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and needle in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_each_metric_has_its_baselines_beside_it(setup):
    """Noise scored like the images, and each image against the reference it was not made from."""
    from instantstyle.baselines import noise_image

    refs = load_references(setup["styles"], setup["tmp"] / "captions.json")
    config = EvalConfig(["a red circle", "a cat"], seeds=[0], steps=1)
    report = evaluate_settings(setup["generator"], refs, [EvalSetting("plain")], config, None, ColourEmbedder())
    samples = report["settings"][0]["samples"]
    noise = report["baselines_by_kind"]["noise images"]
    assert report["baselines"] == {k: v for k, v in noise.items() if v is not None}  # metric -> floor, for sweeps
    colours = ColourEmbedder().embed_images([noise_image((64, 64), i) for i in range(len(samples))])
    target = {"a": ColourEmbedder().embed_images([refs[0].image])[0], "b": [200, 30, 30]}
    expected = np.mean([hand_cosine(c, target[s["style"]]) for c, s in zip(colours, samples)])
    assert noise["style_similarity"] == pytest.approx(expected, abs=1e-6)
    other = report["baselines_by_kind"]["another style's reference"]
    swapped = np.mean([s["style_similarity"] for s in samples])  # two styles: each one's samples against the other
    assert other["text_alignment"] is None and other["style_similarity"] != pytest.approx(swapped)
    images = [setup["generator"].generate(r.image, config.prompts, seed=0, steps=1) for r in refs]
    by_other = [hand_cosine(c, target["b" if r.name == "a" else "a"])
                for r, row in zip(refs, images) for c in ColourEmbedder().embed_images(row)]
    assert other["style_similarity"] == pytest.approx(np.mean(by_other), abs=1e-6)
