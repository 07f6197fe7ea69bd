"""One typed schema per config group: the single source of defaults, types and value ranges.

Each dataclass is registered with Hydra's ConfigStore and ``configs/train.yaml`` starts from
``train_schema``, so the YAML files only choose and override: an unknown key or a value of
the wrong type fails while composing. A number's range is declared beside its default
(``ranged(42, ge=0)``, train/ranges.py) and checked, with every other value rule, in the
section's ``__post_init__`` when it becomes typed (``section``). Every failure is a ``ConfigError`` whose message is one line.
This module imports no torch or diffusers, so config mistakes are reported in about a second.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.cache_settings import register_cache_resolver
from train.errors import ConfigError
from train.ranges import check_ranges, ranged


def _config_dir() -> Path:
    """The Hydra configs: inside the package when installed from a wheel, else the checkout's configs/."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if (packaged / "train.yaml").is_file() else here.parent / "configs"


CONFIG_DIR = _config_dir()
LR_SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "no", "fp16", "bf16")
ADAPTER_TYPES = ("ip_adapter", "ip_adapter_plus")
LOGGERS = ("none", "tensorboard", "wandb")
QUANTIZE = ("none", "int8", "fp8", "nf4")  # instantstyle.quantize.METHODS (this module imports no torch)
WANDB_MODES = ("online", "offline", "disabled")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation (the image processors' default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SHARDS_REQUIRED = ("data.shards is required, e.g. data.shards='DIR/*.tar' (python -m data_tools.synthetic "
                   "--out DIR --num 64 makes some)")


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ``ConfigError`` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class ModelConfig:
    """``model``: the frozen base (built by ``train.builders.build_base``)."""

    _target_: str = "train.builders.build_base"
    path: str = MISSING                 # diffusers folder or hub id of the base
    image_encoder: Optional[str] = None  # REPO:SUBFOLDER or a folder; null = PATH/image_encoder
    hub_id: Optional[str] = None        # the Hub id exports record when path is a local copy of a Hub model
    check_content_space: bool = True    # image and text embeddings must share one space (content subtraction)
    build_if_missing: bool = False      # make the tiny random base at PATH on first use
    quantize: str = "none"              # none | int8 | fp8 | nf4: the frozen UNet / FLUX transformer + T5 (torchao)

    def __post_init__(self) -> None:
        require([(self.quantize in QUANTIZE, f"model.quantize={self.quantize!r} — valid: {', '.join(QUANTIZE)}")])


@dataclass
class AdapterConfig:
    """``adapter``: what is trained (built by ``train.builders.build_adapter`` on the base)."""

    _target_: str = "train.builders.build_adapter"
    _partial_: bool = True
    type: str = "ip_adapter"            # ip_adapter | ip_adapter_plus
    # image tokens the projection makes (ip_adapter 4, ip_adapter_plus 16)
    num_tokens: int = ranged(4, ge=1, le=1024)
    # Plus only: resampler width (1280 matches the public SDXL Plus files)
    resampler_dim: int = ranged(1280, ge=1, le=16384)
    init_from: Optional[str] = None     # an exported or public IP-Adapter .safetensors/.bin to start from

    def __post_init__(self) -> None:
        check_ranges(self, "adapter")
        require([(self.type in ADAPTER_TYPES, f"adapter.type={self.type!r} — valid: {', '.join(ADAPTER_TYPES)}")])


@dataclass
class BlocksConfig:
    """``blocks``: which cross-attention blocks get an image branch (``instantstyle.blocks.resolve_blocks``)."""

    preset: str = "style"                    # style | layout | style_layout | all (resolved per model family)
    targets: Optional[List[str]] = None      # a custom list of block prefixes; wins over the preset

    def __post_init__(self) -> None:
        targets = self.targets
        require([(targets is None or (not isinstance(targets, str) and all(isinstance(t, str) and t for t in targets)),
                  f"blocks.targets={targets!r} must be a list of block names, e.g. "
                  "blocks.targets=[up_blocks.0.attentions.1], or null for blocks.preset"),
                 (targets is None or len(targets) > 0, "blocks.targets=[] selects no block, so nothing would train; "
                  "list blocks, e.g. blocks.targets=[up_blocks.0.attentions.1], or set it to null for blocks.preset")])


@dataclass
class DataConfig:
    """``data``: WebDataset shards → SDXL batches (``train.data.build_train_loader``)."""

    shards: Any = MISSING            # brace pattern, glob, list, pipe: command or fsspec URL
    # shorter side resized to this, then cropped square
    resolution: int = ranged(1024, ge=8, hint="the VAE works on 8-pixel blocks")
    clip_image_size: int = ranged(224, ge=1)  # image-encoder input, resized (bicubic) from the training crop
    random_crop: bool = False        # a random square crop instead of the centre (coordinates go to micro-conditioning)
    random_flip: bool = False        # crop_coords_top_left is mirrored to match
    shuffle_buffer: int = ranged(1000, ge=0)  # samples shuffled per block (held encoded, per worker)
    num_workers: int = ranged(4, ge=0)   # DataLoader workers per rank; each reads its own shards
    prefetch_factor: int = ranged(2, ge=1)  # batches each worker prepares ahead
    drop_image_prob: float = ranged(0.05, ge=0, le=1)  # classifier-free guidance: image embedding zeroed
    drop_text_prob: float = ranged(0.05, ge=0, le=1)  # caption replaced by ""
    drop_both_prob: float = ranged(0.05, ge=0, le=1)  # both dropped
    # decompression-bomb guard (2× PIL's default); bigger images are skipped
    max_image_pixels: int = ranged(178956970, ge=1)
    clip_mean: List[float] = ranged(list(CLIP_MEAN), length=3)  # image-encoder pixel normalisation
    # image-encoder pixel normalisation
    clip_std: List[float] = ranged(list(CLIP_STD), gt=0, length=3, hint="pixels are divided by it")
    # Aspect-ratio buckets: none = square crops at `resolution`; sdxl = SDXL's 41 sizes scaled to
    # `resolution` (1024 = the published set); or a list [[width, height], ...]. Batches hold one bucket.
    buckets: Any = "none"
    cached: bool = False             # shards hold precomputed encoder outputs (data=cached; data_tools.precompute)
    # data=cached: the cache folder (path or fsspec URL) with its manifest.json and empty_prompt.safetensors;
    # null = the shards' own folder. Needed when the shards are pipe: commands.
    cache_dir: Optional[str] = None
    # Reference augmentation (instantstyle/augment.py), all off by default: what the image encoder sees is
    # cut from the same image as the target but need not share its layout (docs/training.md).
    reference_crop: Optional[List[float]] = None  # [low, high] area fraction of an independent square crop
    reference_flip_prob: float = ranged(0.0, ge=0, le=1)  # horizontal flip of the reference
    reference_shuffle_grid: int = ranged(1, ge=1)  # N×N patch shuffle of the reference (1 = off)

    def __post_init__(self) -> None:
        check_ranges(self, "data")
        drops = self.drop_image_prob + self.drop_text_prob + self.drop_both_prob
        require([
            (_shards_ok(self.shards), f"data.shards={self.shards!r} — give a glob, brace pattern, pipe: command, URL "
                                      "or a list of them, e.g. data.shards='DIR/*.tar'"),
            (0 <= min(self.drop_image_prob, self.drop_text_prob, self.drop_both_prob) and drops <= 1,
             f"data.drop_*_prob must be ≥ 0 and sum to ≤ 1 (they sum to {drops})"),
            (self.reference_crop is None or (len(self.reference_crop) == 2
                                             and 0 < self.reference_crop[0] <= self.reference_crop[1] <= 1),
             f"data.reference_crop={self.reference_crop} — give [low, high] with 0 < low ≤ high ≤ 1, or null"),
            (_buckets_ok(self.buckets), f"data.buckets={self.buckets!r} — valid: none, sdxl, or a list of "
                                        "[width, height] pairs, positive multiples of 8, e.g. [[1024, 1024], [1152, 896]]"),
            (not _is_sdxl(self.buckets) or self.resolution >= 64,
             f"data.buckets=sdxl needs data.resolution ≥ 64, its sides being multiples of 64 (got {self.resolution}): "
             "use data.buckets=none"),
        ])
        self.clip_mean, self.clip_std = tuple(self.clip_mean), tuple(self.clip_std)


def _shards_ok(spec: Any) -> bool:
    """data.shards is a non-empty string or a non-empty list of them (a number or null is a slip)."""
    if isinstance(spec, str):
        return bool(spec.strip())
    return isinstance(spec, (list, tuple)) and bool(spec) and all(isinstance(s, str) and s.strip() for s in spec)


def _is_sdxl(spec: Any) -> bool:
    return isinstance(spec, str) and spec.lower() == "sdxl"


def _buckets_ok(spec: Any) -> bool:
    """The data.buckets forms ``data_tools.buckets.parse_buckets`` accepts (checked here without importing it)."""
    if isinstance(spec, str):
        return spec.lower() in ("none", "sdxl")
    try:
        pairs = [[int(v) for v in pair] for pair in spec]
    except (TypeError, ValueError):
        return False
    return bool(pairs) and all(len(p) == 2 and min(p) > 0 and p[0] % 8 == 0 and p[1] % 8 == 0 for p in pairs)


@dataclass
class OptimConfig:
    """``optim``: the optimizer class over the adapter's parameters (``_partial_``: the trainer passes them)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    _convert_: str = "all"
    lr: float = ranged(1.0e-4, gt=0)     # peak learning rate (after warmup)
    weight_decay: float = ranged(1.0e-2, ge=0)  # decoupled weight decay (AdamW)
    betas: List[float] = ranged([0.9, 0.999], ge=0, lt=1, length=2)  # Adam's moment decays
    eps: float = ranged(1.0e-8, gt=0)    # Adam's denominator guard

    def __post_init__(self) -> None:
        check_ranges(self, "optim")


@dataclass
class LoggerConfig:
    """``logger``: experiment trackers through Accelerate (``train.loggers.build_trackers``)."""

    _target_: str = "train.loggers.build_trackers"
    name: str = "none"                 # none | tensorboard | wandb
    project: str = "instantstyle"      # wandb project
    mode: str = "offline"              # wandb: online | offline (sync later: wandb sync RUN/wandb) | disabled
    entity: Optional[str] = None       # wandb team or user; null = your default
    tags: List[str] = field(default_factory=list)  # wandb run tags

    def __post_init__(self) -> None:
        require([(self.name in LOGGERS, f"logger.name={self.name!r} — valid: {', '.join(LOGGERS)}"),
                 (self.mode in WANDB_MODES, f"logger.mode={self.mode!r} — valid: {', '.join(WANDB_MODES)}")])


@dataclass
class TrainerConfig:
    """``trainer``: the loop's settings."""

    batch_size: int = ranged(4, ge=1)    # per process; global batch = batch_size × accumulation × processes
    gradient_accumulation_steps: int = ranged(1, ge=1)  # micro-batches per optimizer step
    max_steps: int = ranged(1000, ge=1)  # optimizer steps
    lr_scheduler: str = "constant"       # constant | cosine | linear, each after linear warmup
    warmup_steps: int = ranged(0, ge=0)  # linear lr warmup from 0
    # null = no clipping (the norm is still logged)
    max_grad_norm: Optional[float] = ranged(1.0, gt=0, hint="or null for no clipping")
    mixed_precision: str = "auto"        # auto | no | fp16 | bf16: frozen nets run in it, adapter weights stay fp32;
                                         # auto = bf16 where the GPU has it, fp16 on older GPUs, no on CPU
    allow_tf32: bool = True              # TF32 matmuls/convolutions on CUDA (Ampere+): ~2x faster fp32 parts
    compile: bool = False                # torch.compile the UNet (first steps slower while it compiles)
    channels_last: bool = False          # UNet weights/activations in NHWC: faster convolutions on tensor cores
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    # steps; 0 = only at the end and on preemption
    checkpoint_every: int = ranged(500, ge=0, hint="0 = only at the end")
    checkpoints_to_keep: int = ranged(3, ge=1)  # older checkpoints are deleted
    seed: int = ranged(42, ge=0, le=2**32 - 1)  # data order, noise, dropout and init all follow from it
    noise_offset: float = ranged(0.0, ge=0)  # e.g. 0.05: lets the model learn very dark/bright images
    snr_gamma: Optional[float] = ranged(None, gt=0, hint="e.g. 5.0, or null")  # e.g. 5.0: min-SNR-γ loss weighting
    # λ of content-decoupled training: the reference's image embedding minus
    # λ × its caption's text embedding (InstantStyle's subtraction; ip_adapter)
    content_scale: float = ranged(0.0, ge=0)
    content_normalize: bool = False      # subtract on unit directions, rescaled to the image norm (λ ∈ [0, 1])
    # e.g. 0.999: EMA decay of the adapter weights (exported when set)
    ema: Optional[float] = ranged(None, gt=0, lt=1, hint="a decay such as 0.999, or null")
    log_every: int = ranged(10, ge=1)    # steps between log lines and tracker points
    # steps between losses on a fixed held-out batch; 0 = off (metrics: validation.*)
    validate_every: int = ranged(0, ge=0)
    record_sample_keys: bool = False     # write each rank's consumed sample keys to RUN/sample_keys/ (debugging)
    # inf/NaN loss or gradient: the step is skipped; this many in a row stop the run
    max_nonfinite_steps: int = ranged(10, ge=1)
    # steps between the ranks' agreement on a stop signal (a host sync);
    # always checked before a checkpoint; keep steps × this well under 30 s
    stop_check_every: int = ranged(10, ge=1)
    # how long ranks wait in a collective (base download, rank-0 work); at most a week
    collective_timeout_s: int = ranged(1800, ge=60, le=7 * 24 * 3600)

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        check_ranges(self, "trainer")
        t = self
        require([
            (t.lr_scheduler in LR_SCHEDULERS, f"trainer.lr_scheduler={t.lr_scheduler!r} — valid: {', '.join(LR_SCHEDULERS)}"),
            (t.mixed_precision in PRECISIONS, f"trainer.mixed_precision={t.mixed_precision!r} — valid: {', '.join(PRECISIONS)}"),
        ])

    @property
    def weight_dtype(self):
        """dtype of the frozen networks."""
        import torch

        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mixed_precision]


def choose_precision(requested: str, *, cuda: bool, bf16: bool) -> str:
    """``auto`` → bf16 on GPUs that have it, fp16 on older GPUs, no on CPU; any other value as given."""
    if requested != "auto":
        return requested
    if not cuda:
        return "no"
    return "bf16" if bf16 else "fp16"


def resolve_precision(trainer: TrainerConfig) -> TrainerConfig:
    """``trainer`` with ``mixed_precision=auto`` replaced by what this machine's accelerator supports."""
    from dataclasses import replace

    if trainer.mixed_precision != "auto":
        return trainer
    import torch

    cuda = torch.cuda.is_available()
    # Compute capability 8 (Ampere) and up have bf16 tensor cores; older GPUs only emulate it, slowly.
    bf16 = cuda and torch.cuda.get_device_capability()[0] >= 8
    return replace(trainer, mixed_precision=choose_precision("auto", cuda=cuda, bf16=bf16))


@dataclass
class ValidationConfig:
    """``validation``: evaluation metrics on fixed style references during training.

    Every ``every`` steps and at the end, the live adapter (not EMA) generates styles × prompts × seeds;
    the report goes to RUN/eval/step-XXXXXXXX/ (metrics.json, metrics.md, grid.png), the means to the
    trackers as val/*, the grid as the image val/grid.
    """

    styles: Optional[str] = None     # folder of style images (+ a .txt content caption beside each); null = off
    prompts: Any = None              # text file (one prompt per line) or a list, e.g. ["a cat", "a house"]
    every: int = 0                   # steps between evaluations; 0 = with each checkpoint and at the end
    steps: int = 20                  # denoising steps per image
    seeds: List[int] = field(default_factory=lambda: [0])  # one image per style × prompt × seed
    content_scale: float = 0.0       # λ of content subtraction (needs the captions and adapter=ip_adapter)
    height: Optional[int] = None     # null = the base's default size
    width: Optional[int] = None      # null = the base's default size
    csd: Optional[str] = None        # CSD checkpoint (.pth/.safetensors): adds val/csd_style_similarity
    dino: Optional[str] = None       # DINO / DINOv2 folder: adds val/dino_content_leakage

    def __post_init__(self) -> None:
        check_ranges(self, "validation")
        sizes_ok = all(s is None or (s > 0 and s % 8 == 0) for s in (self.height, self.width))
        require([
            (self.every >= 0, f"validation.every must be ≥ 0 (0 = with each checkpoint), got {self.every}"),
            (self.steps >= 1, f"validation.steps must be ≥ 1 (denoising steps), got {self.steps}"),
            (len(self.seeds) > 0, f"validation.seeds must be a list of integers, e.g. [0, 1] (got {list(self.seeds)})"),
            (sizes_ok, f"validation.height/width must be positive multiples of 8, or null (got {self.height}x{self.width})"),
            (self.styles is not None or self.every == 0, f"validation.every={self.every} needs validation.styles=DIR "
             "(style images with .txt content captions), or set validation.every=0"),
        ])

    @property
    def enabled(self) -> bool:
        """True when the loop should evaluate: style references given (samples by default, as peers do)."""
        return self.styles is not None


@dataclass
class TrainConfig:
    """The whole training config (``configs/train.yaml`` on top of this schema)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = MISSING   # the run folder (train.yaml defaults it to Hydra's run dir)
    resume: Optional[str] = "auto"  # auto = newest complete checkpoint, PATH = that folder, none = fresh


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
register_cache_resolver()  # ${cache:...} in configs/data/cached.yaml
GROUPS = {"model": ModelConfig, "adapter": AdapterConfig, "blocks": BlocksConfig, "data": DataConfig,
          "optim": OptimConfig, "logger": LoggerConfig, "trainer": TrainerConfig, "validation": ValidationConfig}


def section(node: Any, name: str, schema: type):
    """A config section as its typed dataclass (range checks run); ``ConfigError`` on a bad value."""
    if isinstance(node, schema):
        return node
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node or {}))
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err, name)) from None


def one_line(err: Exception, prefix: str = "") -> str:
    """An OmegaConf/Hydra error as one line, naming the key and, for a typo, the closest valid key."""
    cause = err
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    key = str(getattr(cause, "full_key", "") or "")
    if prefix and key and not key.startswith(prefix + "."):
        key = f"{prefix}.{key}"
    text = (str(cause).splitlines() or [type(cause).__name__])[0]
    options, missing = getattr(cause, "options", None), getattr(cause, "missing_cfg_file", None)
    if options and missing and "/" in missing:  # Hydra's MissingConfigException: a group choice that doesn't exist
        group, _, choice = missing.rpartition("/")
        return f"{group}={choice} — valid: {', '.join(options)}"
    if "not in struct" in text or ("Key '" in text and "not in" in text):
        return unknown_key(key)
    if isinstance(cause, OmegaConfBaseException) and key:
        return f"{key}: {text}"
    return text.removeprefix("Error merging override ")


def valid_keys(group: str) -> list[str]:
    """The schema's keys of a group (``trainer`` → ``batch_size``, …), without wiring keys."""
    schema = GROUPS.get(group)
    names = [f.name for f in fields(schema)] if schema else [f.name for f in fields(TrainConfig)]
    return [n for n in names if not n.startswith("_")]


# Keys users bring from diffusers' training scripts, where the closest spelling here would mislead.
FOREIGN_KEYS = {"data.center_crop": "crops are centred unless data.random_crop=true"}


def unknown_key(key: str) -> str:
    """"unknown trainer key(s) ['max_stepz'] — did you mean trainer.max_steps?" (or the valid keys)."""
    group, _, name = key.rpartition(".")
    if key in FOREIGN_KEYS:
        return f"unknown {group} key(s) {[name]} — {FOREIGN_KEYS[key]}"
    candidates = valid_keys(group) if group in GROUPS else valid_keys("")
    where = f"{group}." if group in GROUPS else ""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    hint = f"did you mean {where}{close[0]}?" if close else f"valid: {', '.join(where + c for c in candidates)}"
    return f"unknown {group if group in GROUPS else 'config'} key(s) {[name]} — {hint}"


def check_known_keys(cfg: DictConfig) -> None:
    """Every key is in the schema: Hydra lets ``+key=value`` add keys even to typed configs."""
    top = set(valid_keys("")) | {"hydra"}
    for key in cfg:
        if key not in top:
            raise ConfigError(unknown_key(str(key)))
    for group in GROUPS:
        node = cfg.get(group)
        for key in node if isinstance(node, DictConfig) else ():
            if str(key) not in {f.name for f in fields(GROUPS[group])}:
                raise ConfigError(unknown_key(f"{group}.{key}"))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """configs/train.yaml with Hydra overrides, outside ``@hydra.main`` (tests, notebooks); one-line errors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    check_known_keys(cfg)
    return cfg


def check_sections(cfg: DictConfig) -> None:
    """Every group's types and ranges, nothing read from disk (``python -m train`` runs it before importing torch)."""
    if OmegaConf.is_missing(cfg.data, "shards"):
        raise ConfigError(SHARDS_REQUIRED)
    for name, schema in GROUPS.items():
        section(cfg.get(name), name, schema)
