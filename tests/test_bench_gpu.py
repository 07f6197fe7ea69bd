"""The GPU benchmark's code path, checked on CPU with the tiny models (``--dry-run``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks import bench_gpu
from benchmarks.bench_gpu import ENCODINGS, VARIANTS, Row, Setup, build_model, card_peak_tflops, main, run_rows


def table_rows(text: str) -> dict[tuple[str, str, str], list[str]]:
    """{(variant, encoding, compile): remaining cells} of the printed markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] in VARIANTS:
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def tiny_setup(**overrides) -> Setup:
    """The --dry-run setup (tiny models, CPU, fp32, batch 1, one step) with ``overrides``."""
    return replace(bench_gpu.make_setup(bench_gpu.parse_args(["--dry-run"])), **overrides)


def test_dry_run_prints_every_variant_and_encoding_with_positive_numbers(capsys):
    main(["--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith("device: cpu")
    rows = table_rows(out)
    assert set(rows) == {(v, e, "no") for v in VARIANTS for e in ENCODINGS}
    for cells in rows.values():
        samples_per_s, peak_gib, tflop, mfu = map(float, cells)
        assert min(samples_per_s, peak_gib, tflop, mfu) > 0
    # Live encoding adds the frozen encoders' FLOPs to the same UNet step.
    for v in VARIANTS:
        assert float(rows[(v, "live", "no")][2]) > float(rows[(v, "cached", "no")][2])


def test_flops_grow_from_style_block_to_all_blocks_to_tutorial():
    flops = bench_gpu.count_flops(tiny_setup())
    assert 0 < flops["style"] < flops["all"] < flops["tutorial+unet_grad"]
    assert flops["encoders"] > 0


def test_bf16_path_keeps_frozen_unet_bf16_adapter_fp32_and_tutorial_unet_fp32_with_grad():
    setup = tiny_setup(amp=True)
    model, params = build_model(setup, "style", "cpu")
    assert {p.dtype for p in model.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in params} == {torch.float32}
    tutorial, _ = build_model(setup, "tutorial+unet_grad", "cpu")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in tutorial.unet.parameters())


def test_bf16_autocast_rows_run_end_to_end_on_cpu():
    variants = ["style", "tutorial+unet_grad"]
    rows = run_rows(tiny_setup(amp=True), variants, [False], budget_s=60)
    assert [(r.variant, r.encoding) for r in rows] == [(v, e) for v in variants for e in ENCODINGS]
    assert all(r.samples_per_s > 0 and r.peak_gib > 0 for r in rows)


def test_compiled_rows_past_the_time_budget_are_skipped_not_run(monkeypatch):
    compiled = []

    def measure_variant(setup, variant, is_compiled, flops):
        compiled.append(is_compiled)
        return [Row(variant, e, is_compiled, 1.0, 1.0, 1.0) for e in ENCODINGS]

    monkeypatch.setattr(bench_gpu, "measure_variant", measure_variant)
    rows = run_rows(tiny_setup(), ["style"], [False, True], budget_s=1.0)
    assert compiled == [False]
    assert [r.note for r in rows if r.compiled] == ["skipped: --time-budget"] * 2
    assert "skipped: --time-budget" in bench_gpu.format_table(rows, 989.0)


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch, capsys):
    def out_of_memory(setup, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_gpu, "time_steps", out_of_memory)
    main(["--dry-run", "--variants", "all"])
    rows = table_rows(capsys.readouterr().out)
    assert rows[("all", "live", "no")][0] == rows[("all", "cached", "no")][0] == "OOM at batch 1"


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA GeForce RTX 4090", None)])
def test_card_peak_comes_from_the_device_name(name, tflops):
    assert card_peak_tflops(name) == tflops


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_without_a_gpu_only_the_dry_run_is_allowed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "--dry-run" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_failing_compiler_keeps_the_rows_measured_without_it(monkeypatch):
    def measure_variant(setup, variant, compiled, flops):
        if compiled:
            raise RuntimeError("inductor: no C compiler")
        return [Row(variant, e, False, 1.0, 1.0, 1.0) for e in ENCODINGS]

    monkeypatch.setattr(bench_gpu, "measure_variant", measure_variant)
    rows = run_rows(tiny_setup(), ["style"], [False, True], budget_s=1e9)
    assert [(r.compiled, r.note) for r in rows] == [(False, "")] * 2 + [(True, "compile failed: RuntimeError")] * 2


def test_mfu_uses_model_flops_not_what_gradient_checkpointing_recomputes():
    plain = bench_gpu.count_flops(tiny_setup())
    assert bench_gpu.count_flops(tiny_setup(gradient_checkpointing=True)) == plain
