"""The adapter trains exactly the style branches, leaves the base untouched, and computes decoupled attention."""

import copy
import math

import pytest
import torch

from instantstyle.adapter import AdapterSpec, attention_module, install_adapter
from instantstyle.attention import DecoupledCrossAttnProcessor
from instantstyle.blocks import cross_attention_layers
from tests.helpers import perturb_, run_unet, unet_inputs

STYLE = ("up_blocks.0.attentions.1",)


def _spec(blocks=STYLE, adapter_type="ip_adapter"):
    plus = adapter_type == "ip_adapter_plus"
    return AdapterSpec(adapter_type, blocks, 32, 16 if plus else 4, resampler_dim=64)


def _features(adapter_type, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 50, 32) if adapter_type == "ip_adapter_plus" else (batch, 32)
    return torch.randn(shape, generator=g)


def test_trainable_parameters_are_exactly_projection_and_style_branches(tiny_base):
    unet = tiny_base.unet
    adapter = install_adapter(unet, _spec())
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    expected = {f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2.processor.{w}.weight"
                for i in range(2) for w in ("to_k_ip", "to_v_ip")}
    assert trainable == expected
    # 2 layers x (to_k_ip + to_v_ip) x 64x64, plus Linear(32 -> 4*64) and LayerNorm(64).
    assert sum(p.numel() for p in adapter.layers.parameters()) == 2 * 2 * 64 * 64
    assert sum(p.numel() for p in adapter.image_proj.parameters()) == 32 * 256 + 256 + 2 * 64
    assert all(p.requires_grad for p in adapter.parameters())
    for module in (tiny_base.vae, tiny_base.text_encoder, tiny_base.text_encoder_2, tiny_base.image_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_non_target_layers_hold_no_image_branch(tiny_base):
    unet = tiny_base.unet
    install_adapter(unet, _spec())
    branches = [n for n, p in unet.attn_processors.items() if isinstance(p, DecoupledCrossAttnProcessor)]
    assert branches == [n for n in cross_attention_layers(unet.attn_processors) if n.startswith(STYLE[0] + ".")]


def test_branch_starts_as_copy_of_text_key_value(tiny_base):
    unet = tiny_base.unet
    adapter = install_adapter(unet, _spec())
    for name, proc in zip(adapter.layer_names, adapter.layers):
        attn = attention_module(unet, name)
        assert torch.equal(proc.to_k_ip.weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip.weight, attn.to_v.weight)


@pytest.mark.parametrize("adapter_type", ["ip_adapter", "ip_adapter_plus"])
def test_scale_zero_equals_base_unet(tiny_base, adapter_type):
    base = copy.deepcopy(tiny_base.unet)
    adapter = install_adapter(tiny_base.unet, _spec(adapter_type=adapter_type))
    perturb_(adapter)
    inputs = unet_inputs(base)
    tokens = adapter.image_tokens(_features(adapter_type)).detach()
    reference = run_unet(base, inputs)
    adapter.set_scale(0.0)
    torch.testing.assert_close(run_unet(tiny_base.unet, inputs, tokens), reference, rtol=0, atol=1e-6)
    adapter.set_scale(1.0)
    assert (run_unet(tiny_base.unet, inputs, tokens) - reference).abs().max() > 1e-3


def test_only_target_layers_change_their_output(tiny_base):
    """Feed each layer's recorded input to the plain base layer: only style layers differ."""
    base = copy.deepcopy(tiny_base.unet)
    unet = tiny_base.unet
    adapter = install_adapter(unet, _spec(blocks=("up_blocks.0.attentions.1", "mid_block")))
    perturb_(adapter)
    inputs = unet_inputs(base)
    tokens = adapter.image_tokens(_features("ip_adapter")).detach()
    records, hooks = {}, []
    for name in cross_attention_layers(unet.attn_processors):
        module = attention_module(unet, name)
        hooks.append(module.register_forward_hook(
            lambda m, args, kwargs, out, name=name: records.__setitem__(name, (args[0], out)), with_kwargs=True))
    run_unet(unet, inputs, tokens)
    for h in hooks:
        h.remove()
    changed = set()
    for name, (hidden, out) in records.items():
        with torch.no_grad():
            plain = attention_module(base, name)(hidden, encoder_hidden_states=inputs["text"])
        if not torch.allclose(plain, out, rtol=0, atol=1e-6):
            changed.add(name)
    assert changed == set(adapter.layer_names) and len(changed) == 4


def _reference_attention(attn, hidden, context, ip_tokens=None, to_k_ip=None, to_v_ip=None, scale=1.0):
    """softmax(QK^T/sqrt(d))V per head, written out by hand, plus the image term."""
    def heads(x):
        b, n, _ = x.shape
        return x.reshape(b, n, attn.heads, -1).permute(0, 2, 1, 3)

    def attend(q, k, v):
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = weights @ v
        return out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)

    q = heads(hidden @ attn.to_q.weight.T)
    out = attend(q, heads(context @ attn.to_k.weight.T), heads(context @ attn.to_v.weight.T))
    if ip_tokens is not None:
        out = out + scale * attend(q, heads(ip_tokens @ to_k_ip.T), heads(ip_tokens @ to_v_ip.T))
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


class _ReferenceProcessor:
    def __init__(self, branch=None):
        self.branch = branch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        text, tokens = encoder_hidden_states
        if self.branch is None:
            return _reference_attention(attn, hidden_states, text)
        b = self.branch
        return _reference_attention(attn, hidden_states, text, tokens, b.to_k_ip.weight, b.to_v_ip.weight, b.scale)


@pytest.mark.parametrize("adapter_type", ["ip_adapter", "ip_adapter_plus"])
def test_matches_first_principles_reference(tiny_base, adapter_type):
    unet = tiny_base.unet
    adapter = install_adapter(unet, _spec(blocks=("up_blocks.0.attentions.1", "down_blocks.2"),
                                          adapter_type=adapter_type))
    perturb_(adapter, scale=0.2)
    adapter.set_scale(0.7)
    inputs = unet_inputs(unet)
    tokens = adapter.image_tokens(_features(adapter_type)).detach()
    ours = run_unet(unet, inputs, tokens)
    branches = dict(zip(adapter.layer_names, adapter.layers))
    procs = dict(unet.attn_processors)
    for name in cross_attention_layers(procs):
        procs[name] = _ReferenceProcessor(branches.get(name))
    unet.set_attn_processor(procs)
    reference = run_unet(unet, inputs, tokens)
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-5


def test_gradients_reach_only_adapter(tiny_base):
    unet = tiny_base.unet
    adapter = install_adapter(unet, _spec())
    inputs = unet_inputs(unet)
    tokens = adapter.image_tokens(_features("ip_adapter"))
    out = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=(inputs["text"], tokens),
               added_cond_kwargs=inputs["added_cond_kwargs"]).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for n, p in unet.named_parameters() if ".processor." not in n)
