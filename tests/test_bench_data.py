"""The loader benchmark runs end to end on a few small photos and prints one table row per pipeline."""

from __future__ import annotations

import re

from benchmarks.bench_data import main


def test_the_loader_benchmark_prints_the_median_of_its_rounds(tmp_path, capsys):
    main(["--num", "8", "--side", "96", "--workers", "0", "--batch-size", "2", "--resolution", "64",
          "--repeats", "2", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert "median of 2 interleaved rounds" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "×" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| IP-Adapter tutorial (JSON + PIL + CLIPImageProcessor)",
                                                     "| ours (WebDataset shards, train/data.py)",
                                                     "| ours + SDXL aspect buckets (data.buckets=sdxl)"]
    assert rows[0].endswith("| 1.00× |")
    for row in rows:
        low, high = map(float, re.search(r"\| ([\d.]+)–([\d.]+) \|", row).groups())
        median = float(row.split(" | ")[1])
        assert 0 < low <= median <= high
