"""Figures say what they show: grid headers and row labels, readable x-axis labels of the claim plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instantstyle import evaluate
from instantstyle.evaluate import EvalConfig, EvalSetting, StyleReference, build_report, write_report
from instantstyle.grid import make_grid

WHITE = (255, 255, 255)
LONG_PROMPT = "a watercolor painting of a lighthouse on a rocky cliff at dusk with seagulls and a stormy sky " * 3


def tiles(count: int, size: int = 64) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (20 * i, 200, 230)) for i in range(count)]


def has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """Dark pixels (text) inside ``box`` of an image on a white background."""
    region = np.asarray(image.crop(box).convert("L"))
    return region.size > 0 and int((region < 128).sum()) > 10


def test_labels_add_a_header_row_and_a_label_column():
    plain = make_grid(tiles(6), rows=2, cols=3)
    labelled = make_grid(tiles(6), rows=2, cols=3, column_labels=["reference", "a cat", LONG_PROMPT],
                         row_labels=["lambda=0", "lambda=0.5"])
    left, top = labelled.width - plain.width, labelled.height - plain.height
    assert left > 0 and top > 0
    assert has_ink(labelled, (left, 0, labelled.width, top))  # prompts over the columns
    assert has_ink(labelled, (0, top, left, labelled.height))  # row labels at the left
    assert not has_ink(plain, (0, 0, plain.width, plain.height))
    # The images sit below and right of the labels, unchanged.
    assert np.array_equal(np.asarray(labelled.crop((left, top, labelled.width, labelled.height))), np.asarray(plain))


def test_each_column_gets_its_own_header_and_long_prompts_are_cut():
    grid = make_grid(tiles(3), rows=1, cols=3, column_labels=["reference", "", LONG_PROMPT])
    top = grid.height - 64
    assert top < 64  # three lines at most, however long the prompt
    assert has_ink(grid, (0, 0, 64, top)) and not has_ink(grid, (64, 0, 128, top)) and has_ink(grid, (128, 0, 192, top))


def test_label_counts_must_match_the_grid():
    with pytest.raises(ValueError, match="column labels"):
        make_grid(tiles(4), rows=2, cols=2, column_labels=["only one"])


def test_evaluation_grid_labels_reference_prompts_and_lambda(tmp_path, monkeypatch):
    seen = {}

    def recording_grid(*args, **kwargs):
        seen.update(kwargs)
        return make_grid(*args, **kwargs)

    monkeypatch.setattr(evaluate, "make_grid", recording_grid)
    refs = [StyleReference("a", Image.new("RGB", (64, 64), (200, 30, 30)), "a red square")]
    settings = [EvalSetting("plain"), EvalSetting("subtract", blocks="style", content_scale=0.5)]
    config = EvalConfig(["a red circle", "a cat"], cell=32)
    scores = {"style_similarity": 0.5, "text_alignment": 0.2, "content_leakage": 0.1}
    samples = [{"setting": s.name, "style": "a", "prompt": p, "seed": 0, "image": img, **scores}
               for s in settings for p, img in zip(config.prompts, tiles(2))]
    write_report(build_report(samples, settings, config, refs, {}), samples, refs, config, tmp_path)
    assert seen["column_labels"] == ["reference", "a red circle", "a cat"]
    assert "lambda=0 (no content subtraction)" in seen["row_labels"][0]
    assert "lambda=0.5 (content subtracted)" in seen["row_labels"][1] and "blocks style" in seen["row_labels"][1]
    grid = Image.open(tmp_path / "grid.png")
    left, top = grid.width - 3 * 32, grid.height - 2 * 32
    assert left > 0 and top > 0 and has_ink(grid, (left, 0, grid.width, top))


def test_claim_plot_tick_labels_do_not_overlap():
    from benchmarks import toy_models
    from benchmarks.measure_claim import SCORES, claim_figure

    rows = [("none", False), ("style", False), ("style", True), (toy_models.STYLE_BLOCK, False),
            (toy_models.STYLE_BLOCK, True), ("all", False), ("all", True)]
    summary = [{"blocks": b, "subtraction": sub, **{k: 0.5 for k in SCORES}, **{k + "_std": 0.1 for k in SCORES}}
               for b, sub in rows]
    fig = claim_figure(summary)
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in fig.axes[0].get_xticklabels()]
    assert len(boxes) == len(rows)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
