"""Our generation equals stock diffusers' ``load_ip_adapter`` + ``set_ip_adapter_scale`` on our export; our
shards and caches read with the ``webdataset`` package, and shards its ShardWriter writes train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from generate_support import STYLE, STYLE_LAYOUT, as_uint8, export_perturbed, perturbed_adapter, style_image

from instantstyle.export import export_safetensors
from instantstyle.generate import StyleGenerator
from instantstyle.pipeline import diffusers_scale_dict

STEPS = 2
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """Perturbed style and style+layout exports plus a style image."""
    tmp = tmp_path_factory.mktemp("interop")
    return {
        "style": export_perturbed(tiny_model_dir, STYLE, tmp / "style.safetensors"),
        "style_layout": export_perturbed(tiny_model_dir, STYLE_LAYOUT, tmp / "style_layout.safetensors"),
        "image": style_image(tmp / "style.png"),
    }


def stock_images(base_dir, adapter_file, scale, image, num_images=1):
    """What a diffusers user gets: load_ip_adapter on our file, the InstantStyle scale dict, a PIL image."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter_file.parent), subfolder="", weight_name=adapter_file.name)
    pipe.set_ip_adapter_scale(scale)
    out = pipe(PROMPT, ip_adapter_image=image, num_inference_steps=STEPS, num_images_per_prompt=num_images,
               generator=torch.Generator("cpu").manual_seed(0))
    return as_uint8(out.images)


def plain_images(base_dir):
    """The base without any adapter, same seed."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return as_uint8(pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0)).images)


@pytest.mark.parametrize("name,scale", [
    ("style", {"up": {"block_0": [0.0, 1.0, 0.0]}}),
    ("style_layout", {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}),
])
def test_generate_equals_stock_diffusers(tiny_model_dir, files, name, scale):
    from PIL import Image

    image = Image.open(files["image"]).convert("RGB")
    generator = StyleGenerator.from_pretrained(tiny_model_dir, files[name])
    generator.pipe.set_progress_bar_config(disable=True)
    ours = as_uint8(generator.generate(image, PROMPT, steps=STEPS, seed=0, num_images=2))
    stock = stock_images(tiny_model_dir, files[name], scale, image, num_images=2)
    assert diffusers_scale_dict(generator.pipe.unet, generator.blocks, 1.0) == scale
    assert ours.shape == stock.shape == (2, 64, 64, 3)
    assert abs(ours - stock).max() <= 1
    # The adapter must matter, otherwise equality would be vacuous.
    assert abs(ours[:1] - plain_images(tiny_model_dir)).mean() > 2.0


def test_untrained_layers_are_inert_at_any_scale(tiny_model_dir, files):
    from PIL import Image

    image = Image.open(files["image"]).convert("RGB")
    style_only = stock_images(tiny_model_dir, files["style"], {"up": {"block_0": [0.0, 1.0, 0.0]}}, image)
    everywhere = stock_images(tiny_model_dir, files["style"], 1.0, image)
    assert (style_only == everywhere).all()


def test_zeroed_export_equals_base_unet(tiny_model_dir, files, tmp_path):
    tensors = load_file(files["style"])
    zeroed = {k: torch.zeros_like(v) if k.endswith("to_v_ip.weight") else v for k, v in tensors.items()}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("to_v_ip.weight"))
    save_file(zeroed, str(tmp_path / "zero.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        before = pipe.unet(sample, 10, text, added_cond_kwargs=cond).sample
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="zero.safetensors")
        pipe.set_ip_adapter_scale(1.0)
        image_embeds = [torch.randn(2, 1, 32)]
        after = pipe.unet(sample, 10, text, added_cond_kwargs={**cond, "image_embeds": image_embeds}).sample
    assert torch.equal(before, after)


def test_in_memory_adapter_equals_its_export(tiny_model_dir, files, tmp_path):
    """Training validation path (our processors, no file) gives the export's images."""
    base, adapter = perturbed_adapter(tiny_model_dir, STYLE, seed=3)
    path = export_safetensors(adapter, base.unet, tmp_path / "a.safetensors")
    kwargs = dict(steps=STEPS, seed=0, num_images=2, content_prompt="noise", content_scale=0.5)
    in_memory = StyleGenerator.from_base(base, adapter)
    in_memory.pipe.set_progress_bar_config(disable=True)
    ours = as_uint8(in_memory.generate(files["image"], [PROMPT, "a cat"], **kwargs))
    from_file = StyleGenerator.from_pretrained(tiny_model_dir, path)
    from_file.pipe.set_progress_bar_config(disable=True)
    exported = as_uint8(from_file.generate(files["image"], [PROMPT, "a cat"], **kwargs))
    assert ours.shape == (4, 64, 64, 3)
    assert abs(ours - exported).max() <= 1
    assert base.unet.encoder_hid_proj is None  # the training UNet is left as it was


def test_readme_snippet_content_subtraction_with_embeds(tiny_model_dir, files):
    """The diffusers recipe of docs/export.md (precomputed embeds minus λ·content) equals our generate."""
    from diffusers.utils import load_image

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    adapter = files["style_layout"]
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    pipe.set_ip_adapter_scale({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}})
    style = load_image(str(files["image"]))
    with torch.no_grad():
        pixels = pipe.feature_extractor(style, return_tensors="pt").pixel_values.to(pipe.device, pipe.image_encoder.dtype)
        image_embeds = pipe.image_encoder(pixels).image_embeds
        ids = pipe.tokenizer_2(["noise texture"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids.to(pipe.device)
        content = pipe.text_encoder_2(ids).text_embeds
    style_embeds = image_embeds - 0.5 * content
    embeds = torch.stack([torch.zeros_like(style_embeds), style_embeds])  # (2, 1, D): [unconditional; style]
    prompts = [PROMPT, "a cat"]
    stock = pipe(prompts, ip_adapter_image_embeds=[embeds], num_images_per_prompt=2, num_inference_steps=STEPS,
                 generator=torch.Generator("cpu").manual_seed(0)).images
    generator = StyleGenerator.from_pretrained(tiny_model_dir, adapter)
    generator.pipe.set_progress_bar_config(disable=True)
    ours = generator.generate(style, prompts, content_prompt="noise texture", content_scale=0.5, num_images=2,
                              steps=STEPS, seed=0)
    assert len(ours) == 4
    assert abs(as_uint8(ours) - as_uint8(stock)).max() <= 1
    no_content = generator.generate(style, prompts, num_images=2, steps=STEPS, seed=0)
    assert abs(as_uint8(no_content) - as_uint8(stock)).mean() > 0.5  # subtraction changed the images


def test_plus_adapter_matches_stock_and_refuses_content(tiny_model_dir, tmp_path, files):
    """ip_adapter_plus: hidden-state features (black image as unconditional), no content subtraction."""
    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.models import load_base
    from instantstyle.pipeline import GenerationError

    base = load_base(tiny_model_dir)
    torch.manual_seed(2)
    spec = AdapterSpec("ip_adapter_plus", STYLE, image_embed_dim=32, num_tokens=4, resampler_dim=64)
    adapter = install_adapter(base.unet, spec)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    path = export_safetensors(adapter, base.unet, tmp_path / "plus.safetensors")
    from PIL import Image

    image = Image.open(files["image"]).convert("RGB")
    generator = StyleGenerator.from_pretrained(tiny_model_dir, path)
    generator.pipe.set_progress_bar_config(disable=True)
    ours = as_uint8(generator.generate(image, PROMPT, steps=STEPS, seed=0))
    stock = stock_images(tiny_model_dir, path, {"up": {"block_0": [0.0, 1.0, 0.0]}}, image)
    assert abs(ours - stock).max() <= 1
    assert abs(ours - plain_images(tiny_model_dir)).mean() > 1.0
    with pytest.raises(GenerationError, match="ip_adapter_plus, which works on hidden states"):
        generator.generate(image, PROMPT, content_prompt="noise", steps=STEPS)


# --- data interop with the webdataset package (a test dependency): both directions -------------------------

def test_webdataset_reads_our_shards(shards):
    import webdataset as wds

    from data_tools.decode import decode_caption, decode_meta, image_member, open_image
    from data_tools.shards import iter_samples, open_shard

    ours = {}
    for shard in sorted(Path(shards).glob("*.tar")):
        with open_shard(str(shard)) as stream:
            for raw in iter_samples(stream, str(shard)):
                ours[raw.key] = (open_image(image_member(raw.members), 10**8).convert("RGB"),
                                 decode_caption(raw.members), decode_meta(raw.members))
    theirs = list(wds.WebDataset(sorted(str(p) for p in Path(shards).glob("*.tar")), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in theirs] == list(ours) and len(theirs) == 32
    for sample in theirs:
        image, caption, meta = ours[sample["__key__"]]
        picture = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        assert (np.asarray(picture.convert("RGB")) == np.asarray(image)).all()
        assert sample["txt"] == caption and sample["json"] == meta


def test_webdataset_reads_our_embedding_cache(tiny_model_dir, shards, tmp_path):
    import webdataset as wds
    from safetensors.torch import load as load_tensors

    from data_tools import precompute
    from data_tools.embedding_cache import decode_sample, load_spec
    from data_tools.shards import iter_samples, open_shard

    cache = tmp_path / "cache"
    assert precompute.main(["--base", tiny_model_dir, "--shards", f"{shards}/00000.tar", "--out", str(cache),
                            "--resolution", "64", "--batch-size", "4"]) == 0
    with open_shard(str(cache / "00000.tar")) as stream:
        spec = load_spec(cache)
        ours = {raw.key: decode_sample(raw.members, spec) for raw in iter_samples(stream, "00000.tar")}
    theirs = list(wds.WebDataset(str(cache / "00000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in theirs] == list(ours) and len(theirs) == 8
    for sample in theirs:
        tensors, meta = ours[sample["__key__"]]
        loaded = load_tensors(sample["safetensors"])  # bytes: webdataset leaves unknown members alone
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        assert sample["json"] == meta and sample["txt"] == meta["caption"]


def write_with_shardwriter(folder: Path, count: int = 12, per_shard: int = 5) -> list[str]:
    """Shards as webdataset.ShardWriter writes them in img2dataset's layout (jpg, txt, json); their keys."""
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir()
    keys = []
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            buf = io.BytesIO()
            Image.new("RGB", (64 + 8 * (i % 3), 64), (20 * i, 100, 200 - 10 * i)).save(buf, "JPEG")
            key = f"{i:09d}"
            sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"a shape number {i}",
                        "json": {"key": key, "width": 64 + 8 * (i % 3), "height": 64}})
            keys.append(key)
    return keys


@pytest.mark.parametrize("manifest", [False, True])
def test_shards_written_by_webdataset_shardwriter_train(tiny_model_dir, tmp_path, manifest):
    from data_tools import make_manifest
    from data_tools.shards import read_manifest
    from tests.helpers import tiny_overrides
    from train.config import compose
    from train.training import train

    keys = write_with_shardwriter(tmp_path / "foreign")
    assert sorted(p.name for p in (tmp_path / "foreign").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    if manifest:
        assert make_manifest.main([str(tmp_path / "foreign")]) == 0
        assert [s.num_samples for s in read_manifest(tmp_path / "foreign").shards] == [5, 5, 2]
    cfg = compose(tiny_overrides(tiny_model_dir, str(tmp_path / "foreign"), tmp_path / "run", "trainer.max_steps=3",
                                 "trainer.checkpoint_every=0", "trainer.record_sample_keys=true"))
    run = train(cfg)
    seen = [line.split()[1] for line in (tmp_path / "run" / "sample_keys" / "rank0.txt").read_text().splitlines()]
    assert len(seen) == 6 and set(seen) <= set(keys) and len(set(seen)) == 6
    assert run.summary["step"] == 3 and (tmp_path / "run" / "ip-adapter.safetensors").is_file()
