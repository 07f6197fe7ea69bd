"""The three pretraining stages of the toy base: CLIP (contrastive), VAE, text-to-image UNet.

Each stage is a plain function of the in-memory dataset, a step budget and a seed, so the
whole base is a deterministic function of its arguments (at a fixed thread count).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from benchmarks import toy_models
from data_tools.toy_data import ToyData, to_clip, to_unit
from instantstyle.diffusion import prediction_target


@dataclass(frozen=True)
class Budget:
    """How long a stage trains: optimizer steps, batch size, peak learning rate."""

    steps: int
    batch_size: int
    lr: float


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as the SDXL pipeline pads them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _lr_at(step: int, budget: Budget, warmup: int = 50) -> float:
    """Linear warmup, then cosine decay to 10%: short runs still end at a settled point."""
    if step < warmup:
        return budget.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, budget.steps - warmup)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; identical captions in a batch (e.g. two 'a circle') all count as positives."""
    img, txt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
    # SDXL subtracts raw (unnormalised) embeddings, so keep both towers' norms near 1: then
    # image - text(content) removes a comparable amount of content, as with OpenCLIP.
    norms = torch.cat([image_embeds.norm(dim=-1), text_embeds.norm(dim=-1)])
    return loss + 0.1 * (norms - 1).pow(2).mean()


def train_clip(data: ToyData, tokenizer: CLIPTokenizer, budget: Budget,
               seed: int) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """Train the text and vision towers jointly on (image, caption) pairs."""
    torch.manual_seed(seed)
    text, vision = toy_models.build_text_encoder_2(len(tokenizer)), toy_models.build_image_encoder()
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(text.parameters()) + list(vision.parameters()) + [logit_scale]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.01)
    ids = tokenize(tokenizer, data.captions)
    caption_ids = torch.tensor(_caption_index(data.captions))
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(budget.steps), desc="clip", unit="step")
    for step in bar:
        idx = torch.randint(len(data), (budget.batch_size,), generator=g)
        _set_lr(optimizer, _lr_at(step, budget))
        loss = contrastive_loss(vision(to_clip(data.images[idx])).image_embeds, text(ids[idx]).text_embeds,
                                caption_ids[idx], logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


def _caption_index(captions: list[str]) -> list[int]:
    """A stable integer per distinct caption (Python's str hash is salted per process)."""
    index: dict[str, int] = {}
    return [index.setdefault(c, len(index)) for c in captions]


def train_vae(data: ToyData, budget: Budget, seed: int, variance_weight: float = 1e-2) -> AutoencoderKL:
    """Reconstruct from the posterior mean and shrink the posterior variance, then set ``scaling_factor``.

    A minutes-long budget cannot wait for a KL-weighted VAE to learn to beat unit sampling
    noise (its colours come out wrong); pushing the variance to ~0 instead makes
    ``latent_dist.sample()`` (used by adapter training) equal the mean the UNet learnt from.
    """
    torch.manual_seed(seed)
    vae = toy_models.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=budget.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(budget.steps), desc="vae", unit="step")
    for step in bar:
        x = to_unit(data.images[torch.randint(len(data), (budget.batch_size,), generator=g)])
        _set_lr(optimizer, _lr_at(step, budget))
        posterior = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(posterior.mean).sample, x)
        loss = mse + variance_weight * posterior.var.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = vae.encode(to_unit(data.images[:512])).latent_dist.mean
    # SD convention: latents × scaling_factor have unit variance, which the noise schedule assumes.
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latent means of uint8 images."""
    chunks = [vae.encode(to_unit(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(chunks) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(text_encoder_2: CLIPTextModelWithProjection, ids: torch.Tensor,
                    batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds fp16, pooled) exactly as SDXL builds them from two towers sharing weights."""
    embeds, pooled = [], []
    for i in range(0, len(ids), batch):
        out = text_encoder_2(ids[i:i + batch], output_hidden_states=True)
        hidden = out.hidden_states[-2]
        embeds.append(torch.cat([hidden, hidden], dim=-1).half())  # text_encoder == text_encoder_2's tower
        pooled.append(out.text_embeds)
    return torch.cat(embeds), torch.cat(pooled)


def time_ids(batch: int, size: int = toy_models.IMAGE_SIZE) -> torch.Tensor:
    """SDXL micro-conditioning of an uncropped size×size image (what the pipeline passes)."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, budget: Budget,
               seed: int, drop_prob: float = 0.1, ema_decay: float = 0.998) -> UNet2DConditionModel:
    """Text-to-image diffusion under the scheduler's parameterisation; returns the EMA weights."""
    torch.manual_seed(seed)
    unet = toy_models.build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(toy_models.build_scheduler().config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=budget.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(budget.steps), desc="unet", unit="step")
    for step in bar:
        idx = torch.randint(len(latents), (budget.batch_size,), generator=g)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        # The SDXL pipeline's unconditional input is all zeros (force_zeros_for_empty_prompt), so drop to zeros.
        keep = (torch.rand(len(idx), generator=g) >= drop_prob).float()
        text = prompt_embeds[idx].float() * keep.view(-1, 1, 1)
        added = {"text_embeds": pooled[idx] * keep.view(-1, 1), "time_ids": time_ids(len(idx))}
        _set_lr(optimizer, _lr_at(step, budget))
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, prediction_target(scheduler, x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        _ema_update(ema, unet, ema_decay if step > 100 else 0.0)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema.eval()
