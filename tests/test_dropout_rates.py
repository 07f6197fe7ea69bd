"""Classifier-free-guidance dropout honours IP-Adapter's three exclusive bands (image, text, both)."""

import math

import numpy as np
import pytest

from train.config import DataConfig
from data_tools.augment import draw_drops

DRAWS = 20000


@pytest.mark.parametrize("image,text,both", [(0.05, 0.05, 0.05), (0.1, 0.0, 0.2), (0.0, 0.3, 0.0), (0.0, 0.0, 0.0)])
def test_each_band_is_honoured_within_four_sigma(image, text, both):
    cfg = DataConfig(shards="unused", drop_image_prob=image, drop_text_prob=text, drop_both_prob=both)
    rng = np.random.default_rng(1234)
    draws = [draw_drops(rng, cfg) for _ in range(DRAWS)]
    bands = {(True, False): image, (False, True): text, (True, True): both, (False, False): 1 - image - text - both}
    for outcome, rate in bands.items():
        count = sum(d == outcome for d in draws)
        sigma = math.sqrt(DRAWS * rate * (1 - rate))
        assert abs(count - DRAWS * rate) <= 4 * sigma, f"{outcome}: {count} draws, expected {DRAWS * rate:.0f}"
