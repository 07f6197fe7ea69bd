"""Content decoupling: plain subtraction, or subtraction of unit directions rescaled to the image norm."""

import math

import pytest
import torch

from instantstyle.content import ContentSpaceMismatch, decouple_content


def test_plain_decoupling_is_image_minus_scaled_text():
    image = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    text = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(decouple_content(image, text, 0.5), torch.tensor([[3.0, 3.0], [1.0, -3.0]]))


def test_normalized_decoupling_matches_hand_computation():
    # unit image (0.6, 0.8) - 0.5 * unit text (0, 1) = (0.6, 0.3) = (2, 1) * 0.3; rescaled to |image| = 5.
    image = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[0.0, 2.0]])
    expected = torch.tensor([[2 * math.sqrt(5), math.sqrt(5)]])
    out = decouple_content(image, text, 0.5, normalize=True)
    torch.testing.assert_close(out, expected)
    assert out.norm() == pytest.approx(5.0)


def test_normalized_decoupling_ignores_the_text_vector_length():
    image = torch.tensor([[3.0, 4.0]])
    short, long = torch.tensor([[0.0, 0.1]]), torch.tensor([[0.0, 100.0]])
    torch.testing.assert_close(decouple_content(image, short, 0.5, normalize=True),
                               decouple_content(image, long, 0.5, normalize=True))
    assert not torch.allclose(decouple_content(image, short, 0.5), decouple_content(image, long, 0.5))


def test_normalized_decoupling_keeps_dtype_and_zero_scale_is_identity():
    image = torch.tensor([[3.0, 4.0], [-1.0, 0.5]], dtype=torch.float16)
    out = decouple_content(image, torch.tensor([1.0, 1.0]), 0.0, normalize=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, image)


def test_decoupling_rejects_mismatched_spaces():
    with pytest.raises(ContentSpaceMismatch):
        decouple_content(torch.zeros(1, 4), torch.zeros(1, 3), 1.0, normalize=True)
