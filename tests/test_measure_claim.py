"""The claim's bookkeeping: per-seed rows → mean ± std, and the paper's checks read off the means."""

from __future__ import annotations

import pytest

from benchmarks.measure_claim import claim_table, summarise, verdict


def row(seed, blocks, sub, palette, texture, text, leak):
    return {"seed": seed, "blocks": blocks, "subtraction": sub, "palette_match": palette, "texture_match": texture,
            "text_alignment": text, "content_leakage": leak}


ROWS = [
    row(0, "none", False, 0.1, 0.1, 0.6, 0.1), row(1, "none", False, 0.1, 0.1, 0.6, 0.1),
    row(0, "style", False, 0.5, 0.2, 0.6, 0.0), row(1, "style", False, 0.3, 0.2, 0.4, 0.2),
    row(0, "all", False, 0.6, 0.2, 0.3, 0.4), row(1, "all", False, 0.6, 0.2, 0.3, 0.2),
    row(0, "all", True, 0.4, 0.2, 0.4, 0.1), row(1, "all", True, 0.4, 0.2, 0.4, 0.1),
]


def test_summarise_means_and_sample_std_over_seeds():
    style = next(s for s in summarise(ROWS) if s["blocks"] == "style" and not s["subtraction"])
    assert style["seeds"] == 2
    assert style["palette_match"] == pytest.approx(0.4) and style["palette_match_std"] == pytest.approx(0.1414, abs=1e-4)
    assert "| style | no | 0.40 ± 0.14 |" in claim_table(summarise(ROWS))


def test_verdict_compares_each_block_set_with_all_and_no_adapter():
    checks = verdict(summarise(ROWS))
    assert checks == {
        "style: transfers style (palette match above no adapter)": True,
        "style: leaks less content than all blocks": True,  # 0.1 < 0.3
        "style: follows the prompt better than all blocks": True,  # 0.5 > 0.3
        "subtraction lowers leakage of all-block injection": True,  # 0.1 < 0.3
    }
    worse = [r if r["blocks"] != "style" else {**r, "content_leakage": 0.5} for r in ROWS]
    assert not verdict(summarise(worse))["style: leaks less content than all blocks"]
