"""The typed pipeline configuration: the one source of truth for every stage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator,
                      model_validator)

from sims_platform.config import methods

from sims_platform.config.secrets import refuse_credentials


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------
# Data and encoders

# data.crop, and `sims prepare --crop`: how an image becomes a square (data/crop.py implements each mode).
CropMode = Literal["dhariwal", "center", "none"]


class DataConfig(Strict):
    source: Literal["digits", "folder", "webdataset"] = Field(
        "digits", description="digits: scikit-learn's 1,797 handwritten digits shipped in the package; "
        "folder: one sub-folder of images per class; webdataset: tar shards (URI, brace patterns allowed)")
    path: str | None = Field(None, description="folder path or shard URI pattern (folder / webdataset sources)")
    resolution: int = Field(16, ge=4, le=1024, description="images are resized to resolution x resolution")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB")
    crop: CropMode = Field(
        "dhariwal", description="how folder and webdataset images become resolution x resolution squares. "
        "dhariwal: EDM2's ImageNet preparation (dataset_tool.py --transform=center-crop-dhariwal): halve with a "
        "box filter while the short side is at least twice the resolution, bicubic resize of the short side to "
        "the resolution, centre crop; center: the centred square, resized with antialiased bilinear "
        "interpolation; none: square images only (resized like center; any other is an error). An image already "
        "at resolution x resolution (e.g. written by `sims prepare`) is read unchanged by every mode. The digits "
        "source ignores it")
    num_classes: int = Field(10, ge=0, description="0 = unconditional")
    max_images: int | None = Field(None, ge=1, description="use only the first N images (deterministic order)")
    holdout_fraction: float = Field(
        0.25, gt=0, lt=1, description="fraction of each class held out of every training stage (base, aux, "
        "the digits feature network); FID, precision and recall references come from this held-out part only. "
        "Unused when reference_path is set")
    holdout_seed: int = Field(0, ge=0, description="seed of the per-class held-out split (fixed across training "
                              "seeds, so every seed is measured against the same reference)")
    conditional: bool = Field(True, description="false: the diffusion models never see the labels (unconditional, "
                              "label_dim 0) while the data keeps its num_classes labels for the held-out split, "
                              "class_fractions, the digits feature network and shift's classifiers")
    class_fractions: dict[int, float] | None = Field(
        None, description="keep only this fraction (0, 1] of each listed class's training images (unlisted classes "
        "keep all; the held-out reference is unchanged), chosen per class by a permutation seeded with "
        "holdout_seed: e.g. a class-imbalanced base for distribution shifting. Classifiers still train on the "
        "whole training split")
    reference_path: str | None = Field(
        None, min_length=1, description="a separate real dataset as the FID / precision / recall reference "
        "(e.g. ImageNet val as shards when the base was trained on all of ImageNet train): a folder path or shard "
        "URI pattern read like path (same source, resolution, channels and num_classes), all of its images, "
        "never capped by max_images. It replaces the held-out split, so every training stage (base, aux, the "
        "digits feature network) then uses all of path; it must hold none of path's images. null = the "
        "held-out split of path")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("folder", "webdataset") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.reference_path is not None and self.source == "digits":
            raise ValueError("data.reference_path is read like data.path, which needs data.source 'folder' or "
                             "'webdataset'; the digits source has one set, so its reference is the held-out split "
                             "(remove data.reference_path)")
        if self.reference_path is not None and self.reference_path.rstrip("/") == (self.path or "").rstrip("/"):
            raise ValueError(f"data.reference_path is data.path ({self.path}): the reference would be the "
                             "training images; name a separate set (e.g. ImageNet val) or remove it to measure "
                             "against the held-out split")
        return self

    @model_validator(mode="after")
    def _class_fractions(self) -> DataConfig:
        if self.class_fractions is None:
            return self
        if self.num_classes == 0:
            raise ValueError("data.class_fractions needs labelled data (data.num_classes > 0; set "
                             "data.conditional false for an unconditional model)")
        unknown = sorted(c for c in self.class_fractions if not 0 <= c < self.num_classes)
        bad = {c: f for c, f in self.class_fractions.items() if not 0 < f <= 1}
        if unknown:
            raise ValueError(f"data.class_fractions: classes {unknown} are not in 0..{self.num_classes - 1}")
        if bad:
            raise ValueError(f"data.class_fractions: fractions must be in (0, 1], got {bad}")
        return self

    @property
    def label_dim(self) -> int:
        """The class-label width the diffusion models are built with (0 = unconditional)."""
        return self.num_classes if self.conditional else 0

    def reference_data(self) -> DataConfig:
        """The reference set as a source of its own: reference_path read like path, every image of it."""
        if self.reference_path is None:
            raise ValueError("data.reference_path is not set: the reference is the held-out split of data.path")
        return DataConfig(**self.model_dump(exclude={"path", "reference_path", "max_images"}),
                          path=self.reference_path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def vae_kind(vae: str) -> Literal["hub", "location"]:
    """What encoder.vae names. 'location': a storage URI (scheme://) or a path starting with '/', './' or '../';
    'hub': a hub id 'owner/name' (so a relative path must start with './')."""
    if "://" in vae or vae.startswith(("/", "./", "../")):
        return "location"
    if _HUB_ID.match(vae):
        return "hub"
    raise ValueError(f"encoder.vae: '{vae}' is neither a storage URI or path (s3://..., file://..., /..., ./...) "
                     "nor a hub id (owner/name)")


class EncoderConfig(Strict):
    kind: Literal["pixel", "latent"] = Field("pixel", description="pixel: x in [-1, 1]; latent: VAE latents")
    vae: str = Field(
        "stabilityai/sd-vae-ft-mse", description="diffusers AutoencoderKL folder (config.json and "
        "diffusion_pytorch_model.safetensors): a storage URI (s3://, file://, ...) or a path starting with '/', "
        "'./' or '../', pinned by vae_sha256; or a hub id (owner/name), pinned by vae_revision (docs/imagenet.md)")
    vae_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="sha256 of the VAE folder's "
                                   "diffusion_pytorch_model.safetensors, checked on every load (required when vae "
                                   "is a URI or path; optional for a hub id)")
    vae_revision: str | None = Field(None, min_length=1, description="hub id only: the commit hash (or tag) of "
                                     "the model repository, so the weights cannot change under a run")
    vae_config: dict | None = Field(None, description="build a randomly initialised AutoencoderKL from this "
                                    "config instead of loading weights (tests, offline smoke runs)")
    latent_mean: list[float] = Field([5.81, 3.25, 0.12, -2.15], description="raw latent mean per channel (EDM2)")
    latent_std: list[float] = Field([4.17, 4.62, 3.71, 3.28], description="raw latent std per channel (EDM2)")
    final_std: float = Field(0.5, gt=0, description="latents are scaled to this std (sigma_data)")
    batch_size: int = Field(8, ge=1, description="images per VAE call")
    shard_size: int = Field(1000, ge=1, description="encode stage: latents per WebDataset shard")

    @model_validator(mode="after")
    def _pinned(self) -> EncoderConfig:
        """A latent model's VAE must be the same bytes in every process of every run that reads its latents."""
        if self.kind == "latent" and any(s <= 0 for s in self.latent_std):
            raise ValueError(f"encoder.latent_std must be > 0 per channel, got {self.latent_std}")
        if self.kind != "latent" or self.vae_config is not None:
            return self
        kind = vae_kind(self.vae)
        if kind == "location" and self.vae_sha256 is None:
            raise ValueError(f"encoder.vae_sha256 is required: encoder.vae names the folder {self.vae}, and the "
                             "sha256 of its diffusion_pytorch_model.safetensors pins it (sha256sum that file; "
                             "docs/imagenet.md)")
        if kind == "location" and self.vae_revision is not None:
            raise ValueError("encoder.vae_revision is for hub ids; a folder is pinned by encoder.vae_sha256")
        if kind == "hub" and self.vae_revision is None:
            raise ValueError(f"encoder.vae_revision is required: encoder.vae is the hub id '{self.vae}', which "
                             "must be pinned to a commit hash; or stage the folder and give its URI with "
                             "encoder.vae_sha256 (docs/imagenet.md)")
        return self

    def vae_identity(self) -> str:
        """What produced the latents, for lineage: the pinned VAE, or 'random' (vae_config)."""
        if self.kind == "pixel":
            return "none"
        if self.vae_config is not None:
            return "random"
        if vae_kind(self.vae) == "hub":
            return f"{self.vae}@{self.vae_revision}" + (f" sha256:{self.vae_sha256.lower()}" if self.vae_sha256 else "")
        return f"{self.vae}@sha256:{(self.vae_sha256 or '').lower()}"


# ----------------------------------------------------------------------------
# Network


class NetworkConfig(Strict):
    preset: str = Field("digits-tiny", description="a row of sims_platform.models.presets.PRESETS")
    model_channels: int | None = Field(None, ge=8, description="override the preset's base channel count")
    channel_mult: list[int] | None = Field(None, min_length=1, description="override channel multipliers")
    num_blocks: int | None = Field(None, ge=1, description="override blocks per resolution")
    attn_resolutions: list[int] | None = Field(None, description="override resolutions with self-attention")
    dropout: float | None = Field(None, ge=0, lt=1, description="override dropout")
    sigma_data: float = Field(0.5, gt=0, description="EDM sigma_data")


# ----------------------------------------------------------------------------
# Training


class OptimizerConfig(Strict):
    lr: float = Field(1e-2, gt=0, description="EDM2 reference learning rate (Adam)")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam betas")
    ref_images: int = Field(0, ge=0, description="lr decays as 1/sqrt(images/ref_images) after this many "
                            "images; 0 disables the decay")
    rampup_images: int = Field(0, ge=0, description="linear warm-up length in images")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class DistributedConfig(Strict):
    """How one training stage spreads over the ranks torchrun or a PyTorchJob starts (docs/distributed.md)."""

    backend: Literal["auto", "plain", "deepspeed"] = Field(
        "auto", description="plain: PyTorch data parallel (gradient all-reduce), no DeepSpeed needed; "
        "deepspeed: a DeepSpeed engine with ZeRO; auto: deepspeed when zero_stage > 0 or precision is fp16")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage: 1 shards optimizer state, "
                                            "2 adds gradients, 3 adds parameters")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 (plain: autocast, deepspeed: bf16 weights with fp32 master copy); "
        "fp16 (deepspeed only: dynamic loss scaling)")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this; null = off")
    micro_batch: int | None = Field(None, ge=1, description="images per rank per forward pass; the global "
                                    "batch (batch_size) stays fixed and gradients accumulate over "
                                    "batch_size / (micro_batch x world size) passes; null = batch_size / "
                                    "world size (no accumulation)")
    deepspeed: dict = Field({}, description="extra DeepSpeed config, merged over the generated one "
                            "(e.g. {zero_optimization: {stage3_param_persistence_threshold: 0}})")

    @model_validator(mode="after")
    def _backend(self) -> DistributedConfig:
        if self.backend == "plain" and self.zero_stage > 0:
            raise ValueError(f"distributed.zero_stage={self.zero_stage} needs distributed.backend "
                             "deepspeed or auto (plain is data parallel without ZeRO)")
        if self.backend == "plain" and self.precision == "fp16":
            raise ValueError("distributed.precision=fp16 needs distributed.backend deepspeed or auto "
                             "(the plain backend has no loss scaling; use bf16)")
        return self

    def uses_deepspeed(self) -> bool:
        if self.backend == "auto":
            return self.zero_stage > 0 or self.precision == "fp16"
        return self.backend == "deepspeed"


class TrainConfig(Strict):
    images: int = Field(..., ge=1, description="training budget in images seen (B for the aux model)")
    batch_size: int = Field(128, ge=1, description="global batch size")
    optimizer: OptimizerConfig = OptimizerConfig()
    p_mean: float = Field(-0.4, description="EDM2 noise distribution: ln(sigma) ~ N(p_mean, p_std^2)")
    p_std: float = Field(1.0, gt=0)
    ema_std: float = Field(0.1, gt=0, lt=0.28, description="power-function EMA relative std; the EMA weights "
                           "are the ones sampled from")
    label_dropout: float = Field(0.0, ge=0, lt=1, description="drop class labels with this probability "
                                 "(trains the unconditional model classifier-free guidance needs)")
    checkpoint_images: int = Field(20000, ge=1, description="checkpoint every this many images")
    keep_checkpoints: int = Field(2, ge=1, description="how many newest checkpoints to keep")
    snapshots: list[int] = Field([], description="also keep the weights at these image counts for good "
                                 "(e.g. the early model autoguidance uses as its guide)")
    log_images: int = Field(2000, ge=1, description="log the loss every this many images")
    distributed: DistributedConfig = DistributedConfig()
    loader: Literal["memory", "stream"] = Field(
        "memory", description="memory: the whole training set in RAM, batches drawn by index (exact resume); "
        "stream: shards streamed over fsspec, each rank and loader worker reading its own shards, shuffled per "
        "epoch (for sets larger than RAM; a resume restarts the current epoch's stream)")
    loader_workers: int = Field(2, ge=0, description="stream: DataLoader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=1, description="stream: samples in each worker's shuffle buffer")

    @model_validator(mode="after")
    def _micro_batch(self) -> TrainConfig:
        mb = self.distributed.micro_batch
        if mb is not None and self.batch_size % mb:
            raise ValueError(f"distributed.micro_batch={mb} must divide batch_size={self.batch_size} "
                             "(the global batch is split into equal micro-batches)")
        late = [n for n in self.snapshots if not 1 <= n <= self.images]
        if late:  # a snapshot never reached would fail the stage that reads it, after the whole training
            raise ValueError(f"snapshots: {late} lie outside 1..images ({self.images}); a snapshot is the weights "
                             "after that many training images")
        return self


# What the base's training state fixes: a `resume` fine-tune takes these from train_base (stages/training.py); the
# rest of finetune_aux (budget, checkpoints, logging, launch) stays its own.
RESUMED_SETTINGS = ("batch_size", "optimizer", "p_mean", "p_std", "ema_std", "label_dropout")


class AuxInitConfig(Strict):
    """How the auxiliary fine-tune starts from the base (README: "Fine-tuning the aux model"); the real-data control
    always starts the same way."""

    mode: Literal["resume", "transfer", "restart"] = Field(
        "resume", description="resume: continue the base's training state (its final checkpoint: raw weights, "
        "Adam moments, learning-rate schedule, EMA and batch seeds), only the data changes; the base's optimizer, "
        "ema_std and batch_size apply, and B counts from the base's last image. transfer: EDM's transfer learning, "
        "for any base (also imported ones with only EMA weights): the base's EMA weights, fresh Adam warmed up over "
        "finetune_aux.optimizer.rampup_images, its learning-rate schedule evaluated from the base's final image "
        "count on, and an EMA that starts at the starting weights as if they were the average of those images. "
        "restart: the EMA weights, fresh Adam and finetune_aux.optimizer's schedule from image 0, an EMA that "
        "forgets the start at the first step")
    base_images: int | None = Field(
        None, ge=1, description="transfer: the image count where the base's training ended, when its model record "
        "does not say (an imported checkpoint); default: the record's count")


class FinetuneConfig(TrainConfig):
    init: AuxInitConfig = AuxInitConfig()


class GuideConfig(TrainConfig):
    """Autoguidance's guide as EDM2 trains one (Karras et al. 2024): a smaller network than the base, trained on the
    same data for a fraction of its images with a shorter EMA (the train-guide stage)."""

    network: NetworkConfig = Field(..., description="the guide's architecture (e.g. a smaller preset, or fewer "
                                   "model_channels than network)")


# ----------------------------------------------------------------------------
# Sampling, generation, evaluation


class SamplerConfig(Strict):
    steps: int = Field(32, ge=1, description="Heun steps (2*steps-1 network evaluations)")
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the U-Net's convolutions and matmuls under autocast in this dtype; the "
        "preconditioning, log-variance and the sampler's state stay fp32/fp64 as in EDM2. fp16 is for GPUs "
        "(EDM2 samples in fp16 on CUDA); bf16 also runs on CPUs")

    @model_validator(mode="after")
    def _order(self) -> SamplerConfig:
        if self.sigma_min >= self.sigma_max:
            raise ValueError("sampler.sigma_min must be below sampler.sigma_max")
        return self


class GenerateConfig(Strict):
    num_samples: int = Field(2000, ge=1, description="n_s: size of the synthetic set")
    batch_size: int = Field(250, ge=1)
    shard_size: int = Field(1000, ge=1, description="samples per WebDataset shard")
    sampler: SamplerConfig = SamplerConfig()


def _known_method(name: str) -> str:
    if name not in methods.METHODS:
        raise ValueError(f"unknown guidance method {name!r}: expected one of {', '.join(map(repr, methods.NAMES))}")
    return name


# A guidance method: a row of the method table (sims_platform/config/methods.py).
MethodName = Annotated[str, AfterValidator(_known_method), WithJsonSchema({"enum": list(methods.NAMES),
                                                                          "type": "string"})]
# A file digest as `sha256sum` prints it.
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]


class MethodConfig(Strict):
    """One guidance method of the comparison, with its own w grid; w = 0 (the base) is shared by all."""

    name: MethodName = Field(..., description="the method (a row of the method table): " + "; ".join(
        f"{m.name}: {m.description}" for m in methods.METHODS.values()))
    weights: list[float] | dict[str, list[float]] = Field(
        ..., description="w sweep (w >= 0); w = 0 is the base, evaluated once for every method. A method with "
        "several guides takes one sweep per guide, e.g. {sims: [0.25, 0.5], autoguidance: [1.0]}: every "
        "combination is an arm")
    guide_images: int | None = Field(None, ge=1, description="a method guided by an early base (autoguidance): "
                                     "the base snapshot at this many images guides (must be one of "
                                     "train_base.snapshots)")
    guidance_interval: list[float] | None = Field(
        None, exclude_if=lambda v: v is None, description="[sigma_lo, sigma_hi]: guide only at noise levels "
        "sigma_lo <= sigma <= sigma_hi, the base alone elsewhere (Kynkaanniemi et al. 2024); null = every sigma. "
        "NFE/sample counts the sampler's steps inside it")

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not 0 < v[0] < v[1]):
            raise ValueError("expected [sigma_lo, sigma_hi] with 0 < sigma_lo < sigma_hi")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | dict[str, list[float]]) -> list[float] | dict[str, list[float]]:
        if isinstance(v, dict):
            return {name: cls._sweep(ws, f"weights.{name}") for name, ws in v.items()}
        return cls._sweep(v, "weights")

    @staticmethod
    def _sweep(v: list[float], where: str) -> list[float]:
        if not v:
            raise ValueError(f"{where} must list at least one w")
        if len(set(v)) != len(v):
            raise ValueError(f"{where} must be distinct")
        if any(w < 0 for w in v):
            raise ValueError(f"{where} must be >= 0 (0 is the base model)")
        return sorted(float(w) for w in v)

    @model_validator(mode="before")
    @classmethod
    def _weight_names(cls, data: Any) -> Any:
        """A sweep per guide, keyed by the guides' weight names: a one-guide method's is also its plain list."""
        if not isinstance(data, dict) or data.get("name") not in methods.METHODS:
            return data
        name, weights = data["name"], data.get("weights")
        names = list(methods.METHODS[name].weight_names)
        if isinstance(weights, dict):
            unknown = [str(n) for n in weights if n not in names]
            if unknown or len(weights) != len(names):
                raise ValueError(f"weights: {name} takes one sweep per guide {names}, got {list(weights)}"
                                 + (f" ({', '.join(unknown)}: no guide of {name})" if unknown else ""))
            sweeps = [weights[n] for n in names]
            return {**data, "weights": sweeps[0] if len(names) == 1 else dict(zip(names, sweeps))}
        if weights is not None and len(names) > 1:
            raise ValueError(f"weights: {name} takes one sweep per guide, e.g. "
                             + "{" + ", ".join(f"{n}: [0.5]" for n in names) + "}")
        return data

    @property
    def row(self) -> methods.Method:
        """This method's row of the method table."""
        return methods.method(self.name)

    @property
    def grid(self) -> list[methods.Weights]:
        """Every weight setting of the sweep (floats, or one tuple per combination for several guides)."""
        return self.row.grid(self.weights)

    @property
    def guided_weights(self) -> list[methods.Weights]:
        return [w for w in self.grid if not methods.is_base(w)]


class PrecisionRecallConfig(Strict):
    k: int = Field(3, ge=1, description="k-th nearest neighbour radius (Kynkaanniemi et al. 2019 use k = 3)")
    max_samples: int = Field(10000, ge=10, description="at most this many real and generated feature vectors "
                             "(the same number of each, the first of each seed set); bounds memory and time")


class EvaluateConfig(Strict):
    methods: list[MethodConfig] = Field(
        [MethodConfig(name="sims", weights=[0.5, 1.0, 1.5, 2.0])], min_length=1,
        description="the methods compared side by side over the same base, seeds and sampler; the first is the "
        "primary one (summary.json's top-level keys, the feed's default)")
    num_samples: int = Field(2000, ge=2, description="samples per seed set (same seeds for every method and w)")
    repeats: int = Field(3, ge=1, description="disjoint report seed sets: FID/precision/recall are reported as mean "
                         "and sd over them; a further selection set, never reported, chooses each method's best w")
    selection: bool = Field(True, description="true: a further seed set, never reported, chooses each method's w "
                            "among its weights and w = 0 (its best w). false: no selection set, a quarter less "
                            "sampling at 3 repeats; each method lists exactly one w > 0, chosen beforehand on "
                            "other seeds (e.g. a benchmark's tuning seeds), and is reported at it, its gain "
                            "negative where it is worse than the base")
    batch_size: int = Field(250, ge=1)
    features: Literal["digits-classifier", "inception", "dinov2"] = Field(
        "digits-classifier", description="FID feature network: digits-classifier (trained on the run's data), "
        "inception (standard FID: Inception-v3, TF 2015-12-05 weights) or dinov2 (FD_DINOv2: ViT-L/14)")
    features_seed: int = Field(0, ge=0, description="digits-classifier: seed of its training, fixed across the run's "
                               "seed so every training seed of a benchmark is measured with the same feature "
                               "network (the ruler); the network trains on the training split only")
    inception_weights: str | None = Field(
        None, description="inception: path or storage URI (s3://, file://) of the FID Inception-v3 state dict "
        "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or the same tensors as .safetensors)")
    inception_sha256: Sha256 | None = Field(None, description="inception: expected sha256 of inception_weights "
                                            "(checked on every load when set)")
    dinov2_weights: str | None = Field(
        None, description="dinov2: path or storage URI of the DINOv2 ViT-L/14 state dict (facebook/dinov2-large "
        "model.safetensors, or the torch-hub dinov2_vitl14_pretrain.pth)")
    dinov2_sha256: Sha256 | None = Field(None, description="dinov2: expected sha256 of dinov2_weights "
                                         "(checked on every load when set)")
    reference: str | None = Field(None, description="URI of published reference statistics in EDM2's format "
                                  "(dataset-refs/img512.pkl: mu and sigma per metric, read without running "
                                  "code) for features inception/dinov2; null = computed by the reference stage from data.reference_path "
                                  "or the held-out split. "
                                  "Published statistics carry no feature vectors: precision/recall are then null")
    precision_recall: PrecisionRecallConfig = PrecisionRecallConfig()
    sampler: SamplerConfig = SamplerConfig()
    grid_size: int = Field(64, ge=1, description="samples in each PNG grid logged per method and w")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and ("method" in data or "weights" in data):
            raise ValueError("evaluate.method / evaluate.weights were replaced by evaluate.methods, a list such as "
                             "[{name: sims, weights: [0.5, 1.0]}, {name: neon, weights: [0.5, 1.0]}]")
        return data

    @model_validator(mode="after")
    def _feature_inputs(self) -> EvaluateConfig:
        # Pretrained feature networks cannot be downloaded at run time: their weights must be configured.
        if self.features in ("inception", "dinov2") and not getattr(self, f"{self.features}_weights"):
            raise ValueError(f"evaluate.{self.features}_weights is required when evaluate.features is "
                             f"'{self.features}' (a path or URI of the weights; nothing is downloaded at run time)")
        if self.reference and self.features not in ("inception", "dinov2"):
            raise ValueError(f"evaluate.reference holds EDM2 statistics of inception/dinov2 features, not of "
                             f"evaluate.features '{self.features}'")
        return self

    @model_validator(mode="after")
    def _preset_weights(self) -> EvaluateConfig:
        if not self.selection:
            for i, m in enumerate(self.methods):
                if len(m.guided_weights) != 1:
                    raise ValueError(f"evaluate.methods[{i}].weights: with evaluate.selection false each method "
                                     f"is reported at one preset w > 0, but {m.name} lists "
                                     f"{len(m.guided_weights)}; give one, or set evaluate.selection: true to "
                                     "choose among them on a selection seed set")
        return self

    def feature_weights(self) -> tuple[str | None, str | None]:
        """(weights URI, expected sha256) of the configured feature network; (None, None) if it has none."""
        if self.features in ("inception", "dinov2"):
            return getattr(self, f"{self.features}_weights"), getattr(self, f"{self.features}_sha256")
        return None, None

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[MethodConfig]) -> list[MethodConfig]:
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"each method may appear once, got {names}")
        return v

    def method(self, name: str) -> MethodConfig:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"evaluate.methods has no method '{name}' (has {[m.name for m in self.methods]})")

    @property
    def primary(self) -> MethodConfig:
        return self.methods[0]


class ShiftConfig(Strict):
    """Distribution shifting: select-aux classifies the synthetic set and resamples it per class, so that SIMS
    guidance away from the aux fine-tuned on it moves the class histogram toward `target` (README "Distribution
    shifting"; the math in sims_platform/shift/selection.py)."""

    classifier: Literal["digits-classifier"] = Field(
        "digits-classifier", description="the selecting classifier: a digits CNN trained on one stratified half of "
        "the labelled training split; evaluate measures histograms with a second one (same kind, the other half, "
        "another seed), never the selecting one")
    target: dict[int, float] | Literal["uniform"] = Field(
        ..., description="target class proportions {class: p} over every class 0..data.num_classes-1 (each > 0, "
        "summing to 1), or 'uniform'")
    w: float = Field(..., gt=0, description="the guidance weight the aux set is designed for (include it in "
                     "evaluate.methods' sims weights to measure it)")
    aux_samples: int = Field(2000, ge=1, description="size of the selected aux fine-tuning set (drawn with "
                             "replacement only where a class has too few synthetic samples)")
    gain: float = Field(1.0, gt=0, description="calibration: the guidance acts as weight gain * w (an aux "
                        "fine-tuned for a finite budget learns only part of its set's histogram); 1 = the ideal "
                        "formula. evaluate reports the gain fitted from the measured histograms at each w")

    @field_validator("target")
    @classmethod
    def _target(cls, v: dict[int, float] | str) -> dict[int, float] | str:
        if isinstance(v, str):
            return v
        bad = {c: p for c, p in v.items() if not p > 0}
        if bad:
            raise ValueError(f"target proportions must be > 0 (guidance only reweights classes the base "
                             f"produces), got {bad}")
        total = sum(v.values())
        if abs(total - 1) > TARGET_SUM_TOLERANCE:
            raise ValueError(f"target proportions must sum to 1 (within {TARGET_SUM_TOLERANCE}), got {total:.6g}")
        return dict(sorted(v.items()))

    def target_probs(self, num_classes: int) -> list[float]:
        """The target as a list over classes 0..num_classes-1."""
        if self.target == "uniform":
            return [1 / num_classes] * num_classes
        return [self.target[c] for c in range(num_classes)]


# Target proportions written by hand (e.g. ten times 0.1) sum to 1 only up to this.
TARGET_SUM_TOLERANCE = 1e-6


class IterationsConfig(Strict):
    count: int = Field(1, ge=1, le=999, description="how many SIMS iterations (generations) to run")
    train_data: Literal["real", "real+synthetic", "synthetic"] = Field(
        "real", description="what iteration k>0 trains its base on: real only, real plus the previous "
        "iteration's feed samples (synthetic augmentation loop), or the feed only (fully synthetic loop)")
    feed_samples: int = Field(0, ge=0, description="|D_p|: samples the previous iteration feeds forward")
    feed_sampler: Literal["guided", "plain"] = Field("guided", description="feed from the SIMS-guided "
                                                     "sampler (at the iteration's best w) or the plain base")
    feed_method: MethodName | None = Field(None, description="guided feed: the method that samples it (one of "
                                           "evaluate.methods); null = the primary (first) method")
    feed_weight: float | None = Field(None, ge=0, description="fixed w for the guided feed; null = the feed method's "
                                      "best w (chosen on the selection seeds)")

    @model_validator(mode="after")
    def _feed(self) -> IterationsConfig:
        if self.count > 1 and self.train_data != "real" and self.feed_samples == 0:
            raise ValueError("iterations.feed_samples must be > 0 when train_data uses synthetic data")
        return self


LoopArm = Literal["standard", "sims"]


@dataclass(frozen=True)
class Loop:
    """One self-consuming loop of the experiment: an arm fed |D_p| = fraction x |D_r| samples per generation."""

    arm: LoopArm
    fraction: float

    @property
    def name(self) -> str:
        """'<arm>-dp<percent of |D_r|>', e.g. 'sims-dp50': a folder, a CLI value and part of Kubernetes names."""
        return f"{self.arm}-dp{round(self.fraction * 100)}"


class LoopConfig(Strict):
    """Self-consuming loops as an experiment (README "Self-consuming loops"): from one shared generation 0 (base,
    synthetic set, aux, evaluation), every arm x feed fraction runs its own generations 1..G-1; generation g+1's
    base trains on the real training split plus |D_p| samples of generation g's model (or on those samples only)."""

    arms: list[LoopArm] = Field(
        ["standard", "sims"], min_length=1, description="standard: generation g's model is its plain base (feeds "
        "plain samples, evaluated at w = 0); sims: its base guided by loop.method at the w selected on the "
        "selection seeds (generate, finetune-aux and evaluate every generation, feeds guided samples at that w)")
    feed_fractions: list[float] = Field(
        [0.5, 2.0], min_length=1, description="|D_p| per generation as fractions of |D_r|, the real training split "
        "(after the held-out split and data.class_fractions); whole percents (0.25, 0.5, 1, 2); one loop per arm "
        "and fraction")
    generations: int = Field(3, ge=2, description="G: generation 0 (shared by every loop) and G-1 generations, each "
                             "trained on its predecessor's samples")
    accumulate: bool = Field(False, description="generation g trains on every earlier generation's feed of its loop "
                             "(g x |D_p| samples), not only generation g-1's")
    train_data: Literal["real+synthetic", "synthetic"] = Field(
        "real+synthetic", description="real+synthetic: the synthetic augmentation loop (the real training split "
        "plus the feed); synthetic: the fully synthetic loop (the feed only)")
    method: MethodName = Field("sims", description="the sims arm's guidance (one of evaluate.methods): "
                                            "away from the aux fine-tuned on the generation's own synthetic set")

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each arm may appear once, got {v}")
        return v

    @field_validator("feed_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not f > 0 or abs(f * 100 - round(f * 100)) > 1e-6]
        if bad:
            raise ValueError(f"feed fractions must be > 0 and whole percents of |D_r| (e.g. 0.25, 0.5, 2), got {bad}")
        if len({round(f * 100) for f in v}) != len(v):
            raise ValueError(f"feed fractions must be distinct, got {v}")
        return sorted(float(f) for f in v)

    def loops(self) -> list[Loop]:
        """Every loop, arm-major in config order, fractions ascending."""
        return [Loop(arm, f) for arm in self.arms for f in self.feed_fractions]

    def find(self, name: str) -> Loop:
        for loop in self.loops():
            if loop.name == name:
                return loop
        raise KeyError(f"no loop '{name}': this pipeline's loops are {[lp.name for lp in self.loops()]}")


class PretrainedConfig(Strict):
    """Networks that exist already, by URI: EDM2 pickles (read without running their code) or model files
    written by `sims import-edm2` or a previous run."""

    base: str | None = Field(None, description="iteration 0's base model: instead of train-base, the import-base "
                             "step (one process, no GPU) checks that this network matches network and data and "
                             "writes it as iter-00/train-base/model.pt; the lineage records the source")
    guide: str | None = Field(None, description="evaluate.methods autoguidance: the guide network (e.g. EDM2-XS "
                              "at 134 Mi images) instead of a snapshot of the base's own training")


DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"


class RuntimeConfig(Strict):
    """Where every stage computes (sims_platform/utils/accel.py); `--device` on `sims run`/`sims stage` sets
    runtime.device."""

    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto: cuda:LOCAL_RANK when a GPU is "
                        "visible (LOCAL_RANK from torchrun/PyTorchJob, else 0), else cpu; or cpu, cuda, cuda:N")
    tf32: bool = Field(False, description="allow TF32 in CUDA fp32 matmuls and cuDNN convolutions (faster, "
                       "~10-bit mantissa); off as in EDM2's training, so fp32 means fp32. Applied once per process")
    channels_last: bool = Field(True, description="sampling networks (generate, evaluate, feed) and networks "
                                "trained by the plain engine in the channels-last memory layout: oneDNN and cuDNN "
                                "run their convolutions faster (on this project's CPU: about 1.2x for sampling, "
                                "1.07x for the demo's training). Outputs agree with the default layout to float32 rounding "
                                "(~1e-6), not bit for bit; every arm of a comparison, and a resumed training run, "
                                "uses the same layout. DeepSpeed training keeps the default layout")
    local_parts: int = Field(1, ge=1, le=256, description="`sims run` only: the sampling job arrays (generate, "
                             "evaluate) run as this many processes on this machine, as the cluster's Indexed Jobs "
                             "run them (the CPU threads shared among them), their reducer and every other stage in "
                             "the `sims run` process. 1: everything in the `sims run` process. On a small CPU, "
                             "one-thread processes sample faster than one multi-thread process (the demo: 2). "
                             "Results agree to float rounding; pods and `sims stage` ignore it")


class StorageConfig(Strict):
    root: str = Field("file://./out/digits", description="URI of the run's folder (file://, s3://, ...)")


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; null = MLFLOW_TRACKING_URI or a file "
                            "store under the storage root")
    experiment: str = Field("sims", description="MLflow experiment name")


# Sample seeds are ((seed * 1000 + iteration) * 10 + stream) * 10^9 + index (the stages' seed streams), held as
# int64: a larger seed would overflow in generate, after training.
MAX_SEED = (2**63 - 1) // 10**13 - 1


class PipelineConfig(Strict):
    name: str = Field("sims", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="run name (lowercase, digits, '-': it becomes Kubernetes names)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="base seed; every stage derives its seeds from it")
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    network: NetworkConfig = NetworkConfig()
    train_base: TrainConfig
    generate: GenerateConfig = GenerateConfig()
    finetune_aux: FinetuneConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    iterations: IterationsConfig = IterationsConfig()
    pretrained: PretrainedConfig = PretrainedConfig()
    guide: GuideConfig | None = Field(None, description="autoguidance's guide, trained by the train-guide stage on "
                                      "the base's data (EDM2's recipe: a smaller network, a fraction of "
                                      "train_base.images, a shorter ema_std); null = pretrained.guide, else a "
                                      "train_base snapshot at the method's guide_images")
    shift: ShiftConfig | None = Field(None, description="distribution shifting (a select-aux stage between "
                                      "generate and finetune-aux); null = off")
    loop: LoopConfig | None = Field(None, description="self-consuming loops as an experiment: standard vs SIMS "
                                    "arms over feed fractions and generations, from one shared generation 0; "
                                    "null = off")
    runtime: RuntimeConfig = RuntimeConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    def training(self, stage: str) -> TrainConfig:
        """The settings of a training stage; the real-data control fine-tunes exactly as the aux model does."""
        if stage == "train-base":
            return self.train_base
        if stage in ("finetune-aux", "finetune-real-aux"):
            return self.finetune_aux
        if stage == "train-guide" and self.guide is not None:
            return self.guide
        raise ValueError(f"'{stage}' is not a training stage")

    @model_validator(mode="before")
    @classmethod
    def _resume_inherits(cls, data: Any) -> Any:
        """With finetune_aux.init.mode resume, the training settings the base's state fixes default to train_base's."""
        if not isinstance(data, dict) or not isinstance(data.get("finetune_aux"), dict):
            return data
        ft, base = data["finetune_aux"], data.get("train_base")
        init = ft.get("init")
        mode = init.get("mode") if isinstance(init, dict) else getattr(init, "mode", None)
        if (mode or AuxInitConfig.model_fields["mode"].default) != "resume" or base is None:
            return data
        inherited = {name: base[name] if isinstance(base, dict) else getattr(base, name) for name in RESUMED_SETTINGS
                     if name not in ft and (not isinstance(base, dict) or name in base)}
        return {**data, "finetune_aux": {**inherited, **ft}}

    @model_validator(mode="after")
    def _cross(self) -> PipelineConfig:
        refuse_credentials(self)
        names = [m.name for m in self.evaluate.methods]
        if self.data.reference_path is not None and self.evaluate.reference:
            raise ValueError("data.reference_path and evaluate.reference both name the reference: images to compute "
                             "statistics from vs published statistics; keep one of them")
        if self.pretrained.guide is not None and not any(m.row.takes_guide_images for m in self.evaluate.methods):
            guided = [m.name for m in methods.METHODS.values() if m.takes_guide_images]
            raise ValueError(f"pretrained.guide is {guided[0]}'s guide network: add an entry of "
                             f"{' or '.join(map(repr, guided))} to evaluate.methods or remove pretrained.guide")
        if self.guide is not None:
            self._check_guide(self.guide)
        for m in self.evaluate.methods:
            m.row.check(self, m)
        it = self.iterations
        if it.feed_method is not None and it.feed_method not in names:
            raise ValueError(f"iterations.feed_method '{it.feed_method}' is not one of evaluate.methods {names}")
        feeder = self.evaluate.method(it.feed_method) if it.feed_method is not None else self.evaluate.primary
        if it.feed_weight is not None and feeder.row.vector:
            raise ValueError(f"iterations.feed_weight is one w, but the feed method {feeder.name} takes one per guide "
                             f"{list(feeder.row.weight_names)}: leave it null (the feed samples at its best weights)")
        if self.train_base.loader == "stream" and (self.encoder.kind != "latent"
                                                   or self.iterations.train_data == "real+synthetic"):
            raise ValueError("train_base.loader 'stream' reads one shard set: the encoded latents (encoder.kind "
                             "'latent') or the previous feed; use loader 'memory' for pixel data or "
                             "iterations.train_data 'real+synthetic'")
        if self.encoder.kind == "latent" and len(self.encoder.latent_mean) != len(self.encoder.latent_std):
            raise ValueError("encoder.latent_mean and encoder.latent_std must have the same length")
        if self.shift is not None:
            self._check_shift(self.shift)
        if self.loop is not None:
            self._check_loop(self.loop)
        self._check_aux_init()
        return self

    def notes(self) -> list[str]:
        """Settings that are valid but do nothing in this config (`sims validate` prints them)."""
        if self.guide is not None and not any(m.row.takes_guide_images for m in self.evaluate.methods):
            guided = [m.name for m in methods.METHODS.values() if m.takes_guide_images]
            # Not an error: replacing the demo's evaluate.methods (--set) must not also require removing its guide.
            return [f"guide: no evaluate.methods entry uses it ({', '.join(guided)}), so train-guide does not run"]
        return []

    def _check_guide(self, g: GuideConfig) -> None:
        if self.pretrained.guide is not None:
            raise ValueError("guide: pretrained.guide names autoguidance's guide too (one trained here, one "
                             "imported); keep one of them")
        if g.images > self.train_base.images:
            raise ValueError(f"guide.images: {g.images} exceeds train_base.images ({self.train_base.images}); the "
                             "guide is a bad version of the base, trained for a fraction of its images")

    def _check_aux_init(self) -> None:
        ft, mode = self.finetune_aux, self.finetune_aux.init.mode
        if mode == "resume":
            if self.pretrained.base is not None:
                raise ValueError("finetune_aux.init.mode: 'resume' continues the base's training state, but iteration "
                                 "0's base is imported (pretrained.base: weights only); use 'transfer'")
            # Left out, they are the base's (_resume_inherits); a different value would be silently replaced.
            for name in RESUMED_SETTINGS:
                if getattr(ft, name) != getattr(self.train_base, name):
                    raise ValueError(f"finetune_aux.{name}: init.mode 'resume' continues the base's training with "
                                     f"train_base.{name}; remove it, make it equal, or use init.mode 'transfer'")
        if mode == "transfer" and ft.optimizer.rampup_images == 0:
            raise ValueError("finetune_aux.optimizer.rampup_images: init.mode 'transfer' warms the learning rate up "
                             "from fresh Adam moments; set it > 0 (e.g. a tenth of finetune_aux.images)")

    def _check_loop(self, lp: LoopConfig) -> None:
        if self.iterations.count > 1:
            raise ValueError(f"loop runs its own generations (loop.generations = {lp.generations}): "
                             f"iterations.count must be 1, got {self.iterations.count}")
        if set(methods.method(lp.method).stages(self)) != {"finetune-aux"}:
            own = [m.name for m in methods.METHODS.values() if set(m.stages(self)) == {"finetune-aux"}]
            raise ValueError(f"loop.method '{lp.method}' must guide with the generation's own aux only: one of {own}")
        if "sims" in lp.arms and lp.method not in [m.name for m in self.evaluate.methods]:
            raise ValueError(f"loop.arms 'sims' guides with loop.method '{lp.method}', which evaluate.methods "
                             f"lacks: add {{name: {lp.method}, weights: [...]}} to evaluate.methods")
        if self.shift is not None:
            raise ValueError("loop and shift cannot be combined (a loop's aux is the generation's own synthetic set); "
                             "remove one of them")
        if self.train_base.loader == "stream":
            raise ValueError("loop trains each generation on the real split plus several feed shard sets: "
                             "train_base.loader must be 'memory'")

    def for_loop(self, loop: Loop) -> PipelineConfig:
        """The config a loop's stages run with: its evaluation narrowed to its arm (standard: the plain base alone,
        w = 0; sims: loop.method's w sweep), so a generation samples only what its arm's model needs."""
        if self.loop is None:
            raise ValueError("the pipeline has no loop section")
        method = self.evaluate.method(self.loop.method) if loop.arm == "sims" else \
            MethodConfig(name=self.loop.method, weights=[0.0])
        return self.model_copy(update={"evaluate": self.evaluate.model_copy(update={"methods": [method]})})

    def _check_shift(self, sh: ShiftConfig) -> None:
        k = self.data.num_classes
        if k < 2:
            raise ValueError("shift needs labelled data with at least 2 classes (data.num_classes >= 2; set "
                             "data.conditional false for an unconditional model)")
        if isinstance(sh.target, dict):
            unknown = sorted(c for c in sh.target if not 0 <= c < k)
            missing = sorted(set(range(k)) - set(sh.target))
            if unknown:
                raise ValueError(f"shift.target: classes {unknown} are not in 0..{k - 1} (data.num_classes {k})")
            if missing:
                raise ValueError(f"shift.target: classes {missing} have no proportion; list every class "
                                 f"0..{k - 1} with p > 0 (guidance cannot remove a class)")
        if not any("finetune-aux" in m.row.stages(self) for m in self.evaluate.methods):
            raise ValueError("shift selects the aux set of sims/neon: add a 'sims' entry to evaluate.methods")
