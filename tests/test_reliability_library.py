"""Hostile inputs to adapter files and the command lines: one line, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from generate_support import STYLE, export_perturbed, style_image

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.errors import AdapterFileError
from instantstyle.export import export_safetensors, load_adapter, read_adapter_file
from instantstyle.generate import StyleGenerator
from instantstyle.generate import main as generate_main
from train.checkpoint import STATE_FILE, CheckpointManager
from train.export import main as export_main

SPEC = AdapterSpec(blocks=STYLE, image_embed_dim=32)


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    return {"adapter": export_perturbed(tiny_model_dir, STYLE, tmp / "ip-adapter.safetensors"),
            "image": style_image(tmp / "style.png"), "tmp": tmp}


def assert_one_line(rc: int | None, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err


def rewritten(files, name: str, *, metadata: dict | None = None, tensors: dict | None = None):
    """A copy of the good export with some metadata fields or tensors replaced."""
    good = read_adapter_file(files["adapter"])
    path = files["tmp"] / name
    save_file({**good[0], **(tensors or {})}, str(path), metadata={**good[1], **(metadata or {})})
    return path


def generate_args(files, tiny_model_dir, **override) -> list[str]:
    args = {"--base": tiny_model_dir, "--adapter": str(files["adapter"]), "--style-image": str(files["image"]),
            "--prompt": "a cat", "--steps": "1", "--out": str(files["tmp"] / "out.png"), **override}
    return [x for k, v in args.items() for x in (k, v)]


# A. adapter files with bad metadata or bad tensors


@pytest.mark.parametrize("field,value", [
    ("target_blocks", "up_blocks.0.attentions.1"),  # not JSON
    ("target_blocks", "5"),  # JSON, but an integer
    ("target_blocks", "[1, 2]"),  # JSON list of non-names
    ("resampler_dim", "wide"),
    ("num_tokens", "4.5"),
])
def test_bad_metadata_is_one_adapter_file_error(files, tiny_base, tiny_model_dir, capsys, field, value):
    path = rewritten(files, f"bad-{field}.safetensors", metadata={field: value})
    with pytest.raises(AdapterFileError) as err:
        load_adapter(path, tiny_base.unet)
    assert path.name in str(err.value) and field in str(err.value) and "\n" not in str(err.value)
    rc = generate_main(generate_args(files, tiny_model_dir, **{"--adapter": str(path)}))
    assert_one_line(rc, capsys.readouterr().err, path.name, field)


def test_legacy_bin_with_string_values_is_refused(tiny_base, tmp_path):
    torch.save({"image_proj": {"proj.weight": "abc"}, "ip_adapter": {}}, tmp_path / "strings.bin")
    with pytest.raises(AdapterFileError, match=r"strings\.bin.*image_proj\.proj\.weight"):
        load_adapter(tmp_path / "strings.bin", tiny_base.unet)
    torch.save({"image_proj": "abc", "ip_adapter": {}}, tmp_path / "flat.bin")
    with pytest.raises(AdapterFileError, match=r"flat\.bin.*image_proj"):
        load_adapter(tmp_path / "flat.bin", tiny_base.unet)
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(AdapterFileError, match=r"junk\.bin"):
        load_adapter(tmp_path / "junk.bin", tiny_base.unet)


def test_truncated_safetensors_is_one_line(files, tiny_base, tmp_path):
    data = files["adapter"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match=r"cut\.safetensors"):
        load_adapter(tmp_path / "cut.safetensors", tiny_base.unet)


@pytest.mark.parametrize("kind", ["nan", "inf", "int"])
def test_non_finite_or_integer_weights_are_refused(files, tiny_base, tiny_model_dir, capsys, kind):
    weight = load_file(files["adapter"])["ip_adapter.1.to_v_ip.weight"].clone()
    if kind == "int":
        weight = weight.to(torch.int64)
    else:
        weight[0, 0] = float(kind)
    path = rewritten(files, f"{kind}.safetensors", tensors={"ip_adapter.1.to_v_ip.weight": weight})
    needle = "must be floating point" if kind == "int" else "NaN or inf"
    with pytest.raises(AdapterFileError, match=needle):
        load_adapter(path, tiny_base.unet)
    rc = generate_main(generate_args(files, tiny_model_dir, **{"--adapter": str(path)}))
    assert_one_line(rc, capsys.readouterr().err, path.name, "ip_adapter.1.to_v_ip.weight", needle)


# B. train.export on broken checkpoints and bad --out


@pytest.fixture()
def checkpoint(tiny_model_dir, tmp_path):
    """A checkpoint folder as training writes it (adapter state + trainer_state.json), without training."""
    from instantstyle.models import load_base

    adapter = install_adapter(load_base(tiny_model_dir).unet, SPEC)
    identity = {"base_model": tiny_model_dir, "target_blocks": list(STYLE), "adapter_type": SPEC.adapter_type,
                "num_tokens": SPEC.num_tokens, "image_embed_dim": SPEC.image_embed_dim,
                "resampler_dim": SPEC.resampler_dim, "image_encoder": f"{tiny_model_dir}:image_encoder",
                "world_size": 1}
    return CheckpointManager(tmp_path / "checkpoints", keep=1).save(
        2, {"adapter": adapter.state_dict()}, {"step": 2, "identity": identity}, config_yaml="")


def run_export(argv: list[str], capsys) -> tuple[int | None, str]:
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    return exit_info.value.code, capsys.readouterr().err


def break_checkpoint(folder, how: str) -> None:
    if how == "truncated weights":
        data = (folder / "adapter.safetensors").read_bytes()
        (folder / "adapter.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "broken state":
        (folder / STATE_FILE).write_text('{"step": 2, "identity": {')
    elif how == "no adapter.json":
        (folder / "adapter.json").unlink()
    elif how == "no identity":
        (folder / STATE_FILE).write_text(json.dumps({"step": 2}))


@pytest.mark.parametrize("how,needle", [
    ("truncated weights", "adapter"), ("broken state", STATE_FILE),
    ("no adapter.json", "adapter.json"), ("no identity", "identity"),
])
def test_export_of_broken_checkpoint_is_one_line(checkpoint, tmp_path, capsys, how, needle):
    break_checkpoint(checkpoint, how)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run_export([str(checkpoint), "--out", str(out / "a.safetensors")], capsys)
    assert_one_line(rc, err, needle)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("where", ["missing folder", "existing file"])
def test_export_to_bad_out_is_one_line_and_leaves_nothing(checkpoint, tmp_path, capsys, where):
    out = tmp_path / "nowhere" / "a.safetensors" if where == "missing folder" else tmp_path / "taken"
    if where == "existing file":  # --out DIR is the export folder; a file of that name is in the way
        out.write_text("not a folder")
    rc, err = run_export([str(checkpoint), "--out", str(out)], capsys)
    assert_one_line(rc, err, str(out.parent if where == "missing folder" else out))
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "nowhere").exists()


def test_export_has_normal_permissions(checkpoint, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    export_main([str(checkpoint), "--out", str(out)])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob("*.tmp"))
    assert read_adapter_file(out)[1]["step"] == "2"


def test_failed_library_export_leaves_no_temporary_file(tiny_base, tmp_path):
    adapter = install_adapter(tiny_base.unet, SPEC)
    (tmp_path / "taken.safetensors").mkdir()
    with pytest.raises(AdapterFileError, match="taken.safetensors"):
        export_safetensors(adapter, tiny_base.unet, tmp_path / "taken.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


# C. byte-deterministic export


def test_two_exports_are_byte_identical(tiny_base, tmp_path):
    adapter = install_adapter(tiny_base.unet, SPEC)
    paths = [export_safetensors(adapter, tiny_base.unet, tmp_path / f"{i}.safetensors", base_model="tiny", step=3)
             for i in range(4)]
    assert len({p.read_bytes() for p in paths}) == 1
    blob = paths[0].read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and header["__metadata__"]["step"] == "3"
    tensors, _ = read_adapter_file(paths[0])
    assert all(torch.equal(tensors[k], v) for k, v in load_file(paths[1]).items())


# D. generate's arguments are checked before any model is loaded


@pytest.mark.parametrize("override,needle", [
    ({"--height": "65", "--width": "63"}, "--height"),
    ({"--width": "-8"}, "--width"),
    ({"--steps": "0"}, "--steps"),
    ({"--num-images": "0"}, "--num-images"),
    ({"--out": "OUT/style.png/folder/out.png"}, "is a file, so no folder can be made under it"),  # --out's folder is made
    ({"--out": "OUT/result.txt"}, ".png"),
    ({"--out": "OUT/result"}, ".png"),
])
def test_generate_arguments_fail_before_loading(files, tiny_model_dir, capsys, monkeypatch, override, needle):
    def never(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(StyleGenerator, "from_pretrained", never)
    if "OUT/" in override.get("--out", ""):
        override = {"--out": override["--out"].replace("OUT", str(files["tmp"]))}
    rc = generate_main(generate_args(files, tiny_model_dir, **override))
    assert_one_line(rc, capsys.readouterr().err, needle)


def test_wrong_base_error_names_the_adapters_base(files, tiny_model_dir, capsys):
    wide = torch.zeros(32, 48)
    path = rewritten(files, "other-base.safetensors", metadata={"base_model": "stabilityai/another-base"},
                     tensors={"ip_adapter.1.to_k_ip.weight": wide})
    rc = generate_main(generate_args(files, tiny_model_dir, **{"--adapter": str(path)}))
    assert_one_line(rc, capsys.readouterr().err, "does not fit", "stabilityai/another-base")


@pytest.mark.parametrize("module,needle", [
    ("instantstyle.generate", "(default: 30)"), ("instantstyle.evaluate", "(default: 256)"),
    ("instantstyle.probe_blocks", "(default: 128)"), ("train.export", "(default: fp32)"),
])
def test_help_shows_defaults(module, needle, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert needle in text and "(default: None)" not in text


# G. generation is quiet about our own call pattern


def test_generate_cli_prints_no_deprecation_or_float32_notice(files, tiny_model_dir):
    argv = generate_args(files, tiny_model_dir, **{"--out": str(files["tmp"] / "quiet.jpg")})
    proc = subprocess.run([sys.executable, "-m", "instantstyle.generate", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "torch_dtype" not in proc.stderr and "kept in float32" not in proc.stderr, proc.stderr
    assert (files["tmp"] / "quiet.jpg").is_file()


def test_export_cli_dtype_choices_are_the_library_dtypes():
    from instantstyle.export import DTYPES
    from train.export import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


def test_an_offline_machine_is_told_which_hub_models_to_download(tmp_path, monkeypatch):
    """Offline, the loaders read only the Hugging Face cache; their message alone ("no file named config.json")
    does not say so. Online, or for folders, nothing is added."""
    import huggingface_hub.constants

    from instantstyle.model_ids import offline_download_hint
    from instantstyle.models import BaseModelError, load_base
    from instantstyle.pipeline import meta_unet

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseModelError, match=r"someone/base: .* — HF_HUB_OFFLINE is set, .*`hf download someone/base`"):
        meta_unet("someone/base")  # generate and evaluate read the base's blocks first
    with pytest.raises(BaseModelError, match=r"someone/base/unet: .* — HF_HUB_OFFLINE is set, .*`hf download "):
        load_base("someone/base")
    assert offline_download_hint("someone/base", "h94/IP-Adapter:sdxl_models/image_encoder", "someone/base").count(
        "hf download") == 2
    assert offline_download_hint(str(tmp_path), None) == ""  # a folder: nothing to download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert offline_download_hint("someone/base") == ""
