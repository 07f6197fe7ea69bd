"""Content subtraction is the hand-computed difference in one CLIP space."""

import pytest
import torch

from instantstyle.content import ContentSpaceMismatch, encode_content_prompt, subtract_content


def test_subtraction_matches_hand_computation():
    image = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    text = torch.tensor([[0.5, 0.5, 1.0]])
    expected = torch.tensor([[1.0 - 0.3, 2.0 - 0.3, 3.0 - 0.6], [0.5 - 0.3, -1.0 - 0.3, 4.0 - 0.6]])
    torch.testing.assert_close(subtract_content(image, text, 0.6), expected)
    torch.testing.assert_close(subtract_content(image, text, 0.0), image)


def test_mismatched_spaces_raise_documented_error():
    with pytest.raises(ContentSpaceMismatch, match="1280 and the content text encoder to 768"):
        subtract_content(torch.zeros(1, 1280), torch.zeros(1, 768))


def test_content_embedding_is_text_encoder_2_pooled_projection(tiny_base):
    encoder, tokenizer = tiny_base.text_encoder_2, tiny_base.tokenizer_2
    embeds = encode_content_prompt(encoder, tokenizer, ["a circle", "a star"])
    ids = tokenizer(["a circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny_base.text_encoder_2(ids)
    assert embeds.shape == (2, tiny_base.image_encoder.config.projection_dim)
    torch.testing.assert_close(embeds[:1], out.text_embeds)
    assert not torch.allclose(embeds[0], embeds[1])


def test_base_with_incompatible_content_space_is_rejected(tiny_model_dir, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from instantstyle.models import load_base

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=224, patch_size=32, projection_dim=48))
    encoder.save_pretrained(tmp_path / "enc")
    with pytest.raises(ContentSpaceMismatch, match="projects to 48"):
        load_base(tiny_model_dir, image_encoder=str(tmp_path / "enc"))
