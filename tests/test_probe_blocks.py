"""Block probing on the tiny base: one block at a time really runs alone, and the report is complete."""

from __future__ import annotations

import json

import pytest
from generate_support import export_perturbed, style_image

from instantstyle.blocks import ALL_BLOCKS, block_names, cross_attention_layers
from instantstyle.evaluate import EvalConfig, load_references
from instantstyle.generate import StyleGenerator
from instantstyle.probe_blocks import main, probe, probe_table


@pytest.fixture(scope="module")
def probed(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    styles = tmp / "styles"
    styles.mkdir()
    style_image(styles / "a.png")
    (styles / "a.txt").write_text("a circle\n")
    adapter = export_perturbed(tiny_model_dir, ALL_BLOCKS, tmp / "ip-adapter.safetensors")
    generator = StyleGenerator.from_pretrained(tiny_model_dir, adapter)
    report, samples = probe(generator, load_references(styles), EvalConfig(["a square"], [0], steps=2))
    return {"tmp": tmp, "styles": styles, "adapter": adapter, "generator": generator, "report": report,
            "samples": samples}


def test_each_block_runs_alone(probed):
    blocks = block_names(cross_attention_layers(probed["generator"].pipe.unet.attn_processors))
    settings = {s["name"]: s for s in probed["report"]["settings"]}
    assert list(settings) == ["none", *blocks, "all"]
    assert settings["none"]["enabled_layers"] == []
    for block in blocks:
        assert settings[block]["enabled_blocks"] == [block]
        assert all(layer.startswith(block + ".") for layer in settings[block]["enabled_layers"])
    assert settings["all"]["enabled_blocks"] == blocks


def test_metrics_and_deltas_are_computed(probed):
    settings = probed["report"]["settings"]
    for s in settings:
        assert all(isinstance(s["mean"][m], float) for m in ("style_similarity", "text_alignment", "content_leakage"))
    none = settings[0]
    assert none["delta"]["style_similarity"] == 0.0
    block = settings[1]
    assert block["delta"]["style_similarity"] == pytest.approx(
        block["mean"]["style_similarity"] - none["mean"]["style_similarity"])
    # A perturbed branch changes the image somewhere: not every block may score like no adapter.
    assert any(abs(s["delta"]["style_similarity"]) > 1e-6 for s in settings[1:])
    assert probe_table(probed["report"]).count("\n") == len(settings) + 2


def test_cli_writes_table_and_chart(probed, tiny_model_dir, capsys):
    out = probed["tmp"] / "report"
    code = main(["--base", tiny_model_dir, "--adapter", str(probed["adapter"]), "--styles", str(probed["styles"]),
                 "--prompts", "a square", "--out", str(out), "--steps", "1"])
    assert code == 0
    assert "up_blocks.0.attentions.1" in capsys.readouterr().out
    report = json.loads((out / "probe.json").read_text())
    assert len(report["settings"]) == 13
    assert (out / "probe.png").stat().st_size > 1000 and (out / "probe.md").is_file()


def test_cli_bad_adapter_is_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    style_image(tmp_path / "s" / "a.png")
    code = main(["--base", tiny_model_dir, "--adapter", str(tmp_path / "missing.safetensors"),
                 "--styles", str(tmp_path / "s"), "--prompts", "a", "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
