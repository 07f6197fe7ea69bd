"""`instantstyle.evaluate --csd/--dino` add the field's metrics; without them the report is as before."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_evaluate import ColourEmbedder
from test_style_metrics import csd_state, hand_cosines, random_csd, save_tiny_vit

import instantstyle.evaluate as evaluate
import instantstyle.style_metrics as style_metrics

PROMPTS = ["a red circle", "a cat"]


class TintGenerator:
    """Stands in for the diffusion model: each prompt tints the reference differently, so every sample differs."""

    pipe = SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)

    def resolve_blocks(self, blocks):
        return blocks

    def generate(self, image, prompts, seed=0, **kwargs):
        pixels = np.asarray(image.convert("RGB").resize((40, 40)), dtype=np.int16)
        return [Image.fromarray(np.clip(pixels + 60 * i - 30 + seed, 0, 255).astype(np.uint8))
                for i, _ in enumerate(prompts)]


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    """Style folder, prompts and metric models on disk; the base model and CLIP evaluator replaced by fakes."""
    styles = tmp_path / "styles"
    styles.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(styles / f"{name}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    visual, head = random_csd()
    save_file(csd_state(visual, head), tmp_path / "csd.safetensors")
    dino = save_tiny_vit(tmp_path / "dino", "vit")
    monkeypatch.setattr(evaluate, "StyleGenerator", SimpleNamespace(from_pretrained=lambda *a, **k: TintGenerator()))
    import instantstyle.metrics as metrics  # evaluate imports it lazily, inside the functions that need it

    monkeypatch.setattr(metrics, "ClipEmbedder", SimpleNamespace(from_pipeline=lambda pipe: ColourEmbedder()))
    args = ["--base", "unused", "--adapter", "unused", "--styles", str(styles), "--prompts",
            str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "report"), "--seeds", "0,5", "--device", "cpu"]
    return SimpleNamespace(tmp=tmp_path, styles=styles, args=args, visual=visual, head=head, dino=dino)


def reference_features(cli, images):
    """CSD vectors through the independent OpenAI-style forward, and DINO class tokens, computed here."""
    csd = style_metrics.CsdEncoder.from_checkpoint(cli.tmp / "csd.safetensors")
    dino = style_metrics.DinoEncoder.from_pretrained(cli.tmp / "dino")
    with torch.no_grad():
        style = cli.visual(csd.processor(images, return_tensors="pt").pixel_values) @ cli.head
        tokens = cli.dino(dino.processor(images, return_tensors="pt").pixel_values).last_hidden_state[:, 0]
    return style, tokens


def test_csd_and_dino_flags_add_hand_checkable_metrics(cli, capsys):
    assert evaluate.main(cli.args + ["--csd", str(cli.tmp / "csd.safetensors"), "--dino", str(cli.tmp / "dino")]) == 0
    report = json.loads((cli.tmp / "report" / "metrics.json").read_text())
    samples = report["settings"][0]["samples"]
    assert len(samples) == 2 * 2 * 2 and report["csd"].endswith("csd.safetensors")
    refs = {name: Image.open(cli.styles / f"{name}.png").convert("RGB") for name in ("a", "b")}
    generated = [TintGenerator().generate(refs[s["style"]], PROMPTS, seed=s["seed"])[PROMPTS.index(s["prompt"])]
                 for s in samples]
    gen_style, gen_tokens = reference_features(cli, generated)
    ref_style, ref_tokens = reference_features(cli, [refs[s["style"]] for s in samples])
    assert [s["csd_style_similarity"] for s in samples] == pytest.approx(hand_cosines(gen_style, ref_style), abs=1e-5)
    assert [s["dino_content_leakage"] for s in samples] == pytest.approx(hand_cosines(gen_tokens, ref_tokens), abs=1e-5)
    mean = report["settings"][0]["mean"]
    assert mean["dino_content_leakage"] == pytest.approx(np.mean([s["dino_content_leakage"] for s in samples]))
    header, rule, row, *baselines = (cli.tmp / "report" / "metrics.md").read_text().splitlines()
    assert [b.split(" |")[0] for b in baselines] == ["| baseline: noise images", "| baseline: another style's reference"]
    assert all(b.count("|") == header.count("|") for b in baselines)
    assert "| CSD style ↑ | DINO leakage ↓ | n |" in header and rule.count("|") == header.count("|")
    assert f"{mean['csd_style_similarity']:.4f}" in row and row.count("|") == header.count("|")


def test_without_flags_the_report_keeps_todays_metrics(cli, capsys):
    assert evaluate.main(cli.args) == 0
    assert capsys.readouterr().out.startswith("device: ")  # the CPU thread choice, or the GPU, first
    report = json.loads((cli.tmp / "report" / "metrics.json").read_text())
    setting = report["settings"][0]
    assert set(setting["mean"]) == {"style_similarity", "text_alignment", "content_leakage"}
    assert not any("csd_style_similarity" in s or "dino_content_leakage" in s for s in setting["samples"])
    assert "csd" not in report and "dino" not in report
    header = (cli.tmp / "report" / "metrics.md").read_text().splitlines()[0]
    assert header == ("| setting | blocks | scale | content scale | style similarity ↑ | text alignment ↑ "
                      "| content leakage ↓ | n |")


@pytest.mark.parametrize("flag,needle", [("--csd", "CSD checkpoint not found"),
                                         ("--dino", "DINO model folder not found")])
def test_missing_metric_models_are_one_line_errors(cli, capsys, flag, needle):
    assert evaluate.main(cli.args + [flag, str(cli.tmp / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (cli.tmp / "report").exists()  # failed before generating anything


def test_optional_metric_names_agree_across_modules():
    from instantstyle.metrics import OPTIONAL_METRICS

    assert list(evaluate.REFERENCE_METRICS) == list(evaluate.OPTIONAL_COLUMNS) == list(OPTIONAL_METRICS)
