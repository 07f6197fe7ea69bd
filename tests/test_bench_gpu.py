"""The GPU benchmark's code path, checked on CPU with the tiny models (``--dry-run``)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from benchmarks import bench_gpu
from benchmarks.bench_gpu import ENCODINGS, VARIANTS, Row, Setup, build_model, card_peak_tflops, main, run_rows
from benchmarks.budget import Clock, is_out_of_memory


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
        samples_per_s, peak_gib, tflop, mfu = map(float, cells[:2] + cells[3:])
        assert min(samples_per_s, peak_gib, tflop, mfu) > 0
        assert cells[2] == "n/a"  # a CPU has no caching allocator: no reserved memory
    # Live encoding adds the frozen encoders' FLOPs to the same UNet step.
    for v in VARIANTS:
        assert float(rows[(v, "live", "no")][3]) > float(rows[(v, "cached", "no")][3])


def test_flops_grow_from_style_block_to_all_blocks_to_tutorial():
    flops = bench_gpu.count_flops(tiny_setup(), list(VARIANTS), Clock(1e9))
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

    def measure_variant(setup, variant, is_compiled, flops, emit):
        compiled.append(is_compiled)
        for e in ENCODINGS:
            emit(Row(variant, e, is_compiled, 1.0, 1.0, 1.0))

    monkeypatch.setattr(bench_gpu, "measure_variant", measure_variant)
    monkeypatch.setattr(bench_gpu, "count_flops", lambda setup, variants, clock: {"style": 1e12, "encoders": 0.0})
    rows = run_rows(tiny_setup(), ["style"], [False, True], budget_s=1.0)
    assert compiled == [False]
    assert [r.note for r in rows if r.compiled] == ["skipped: --time-budget"] * 2
    assert "skipped: --time-budget" in bench_gpu.format_table(rows, 989.0)


def test_out_of_memory_in_one_row_is_that_row_and_the_others_are_still_printed(monkeypatch, capsys):
    time_steps, build = bench_gpu.time_steps, bench_gpu.build_model

    def cublas_fails_on_the_cached_style_row(setup, step):
        calls.append(1)
        if len(calls) == 2:  # style's live row measured, its cached row next
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return time_steps(setup, step)

    def all_blocks_do_not_fit(setup, variant, device):
        if variant == "all" and device != "meta":  # the FLOP count on meta allocates nothing
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(setup, variant, device)

    calls = []
    monkeypatch.setattr(bench_gpu, "time_steps", cublas_fails_on_the_cached_style_row)
    monkeypatch.setattr(bench_gpu, "build_model", all_blocks_do_not_fit)
    main(["--dry-run"])
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {(v, e, "no") for v in VARIANTS for e in ENCODINGS}
    assert float(rows[("style", "live", "no")][0]) > 0
    assert rows[("style", "cached", "no")][0] == "OOM at batch 1"
    assert rows[("all", "live", "no")][0] == rows[("all", "cached", "no")][0] == "OOM at batch 1"
    assert all(float(rows[("tutorial+unet_grad", e, "no")][0]) > 0 for e in ENCODINGS)


@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False)])
def test_allocation_failures_count_as_out_of_memory(error, oom):
    assert is_out_of_memory(error) is oom


def test_rows_are_printed_as_they_are_measured_so_an_abort_keeps_them(monkeypatch, capsys):
    build = bench_gpu.build_model

    def interrupted_at_all_blocks(setup, variant, device):
        if variant == "all" and device != "meta":
            raise KeyboardInterrupt  # an outer timeout, a crashing compiler
        return build(setup, variant, device)

    monkeypatch.setattr(bench_gpu, "build_model", interrupted_at_all_blocks)
    with pytest.raises(KeyboardInterrupt):
        main(["--dry-run"])
    assert set(table_rows(capsys.readouterr().out)) == {("style", e, "no") for e in ENCODINGS}


def test_a_row_still_running_at_the_budget_is_stopped_and_the_run_ends_on_time(monkeypatch):
    monkeypatch.setattr(bench_gpu, "count_flops", lambda setup, variants, clock: {})

    def slow(setup, step):
        time.sleep(30)

    monkeypatch.setattr(bench_gpu, "time_steps", slow)
    start = time.perf_counter()
    rows = run_rows(tiny_setup(), ["style", "all"], [False], budget_s=1.0)
    assert time.perf_counter() - start < 10
    assert [r.note for r in rows] == ["stopped: --time-budget"] * 2 + ["skipped: --time-budget"] * 2
    assert all(r.tflop_per_sample is None for r in rows)  # not counted: n/a in the table
    assert "| style | live | no | stopped: --time-budget | | | n/a | |" in bench_gpu.format_table(rows, 989.0)


def test_flops_are_counted_only_for_the_chosen_variants_and_only_within_the_budget():
    assert set(bench_gpu.count_flops(tiny_setup(), ["style"], Clock(1e9))) == {"encoders", "style"}
    assert bench_gpu.count_flops(tiny_setup(), ["style"], Clock(-1.0)) == {}


def test_encoders_run_outside_autocast_as_the_trainer_runs_them(monkeypatch):
    encode, autocast = bench_gpu.encode_live, []

    def spied(encoders, raw):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return encode(encoders, raw)

    monkeypatch.setattr(bench_gpu, "encode_live", spied)
    run_rows(tiny_setup(amp=True), ["style"], [False], budget_s=1e9)
    assert autocast and not any(autocast)


def test_cuda_rows_report_peak_allocated_and_reserved_memory(monkeypatch):
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None),
                        ("max_memory_allocated", 3 * 2**30), ("max_memory_reserved", 5 * 2**30)]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    seconds, allocated, reserved = bench_gpu.time_steps(tiny_setup(device="cuda"), lambda: None)
    assert (allocated, reserved) == (3.0, 5.0)


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
    def measure_variant(setup, variant, compiled, flops, emit):
        if compiled:
            raise RuntimeError("inductor: no C compiler")
        for e in ENCODINGS:
            emit(Row(variant, e, False, 1.0, 1.0, 1.0))

    monkeypatch.setattr(bench_gpu, "measure_variant", measure_variant)
    rows = run_rows(tiny_setup(), ["style"], [False, True], budget_s=1e9)
    assert [(r.compiled, r.note) for r in rows] == [(False, "")] * 2 + [(True, "compile failed: RuntimeError")] * 2


def test_mfu_uses_model_flops_not_what_gradient_checkpointing_recomputes():
    plain = bench_gpu.count_flops(tiny_setup(), list(VARIANTS), Clock(1e9))
    assert bench_gpu.count_flops(tiny_setup(gradient_checkpointing=True), list(VARIANTS), Clock(1e9)) == plain
