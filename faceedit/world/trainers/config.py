"""The training configuration of the default model set: one frozen, flat dataclass of plain
data (numbers and strings), so it is stored as is in every stage checkpoint and in the run
dir's config.json, and a resumed run can prove it continues the same training.

The network configs of every served model are derived from it (`generator_config()`, ...):
the training config is the single source of every architecture choice.

Why these sizes (64 px, 2-core CPU, <= 90 minutes for everything):
* generator: capped channels 1024 // res (max 128): 128 ch at 4-8 px, 64 at 16, 32 at 32, 16
  at 64. About 0.1 GMAC per image, ~0.5M parameters; the synthetic faces are flat-shaded,
  so thin high-resolution layers cost little quality and most of the training time.
* style_dim 64: e4e's GradualStyleBlocks hold ~50 style_dim x style_dim 3x3 convs; at 128
  the encoder alone would be ~29 MB of ONNX.
* encoder: the IR-SE50 (e4e's backbone, 50 layers) with narrow stages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from faceedit.nets.bisenet import BiSeNetConfig
from faceedit.nets.classifier import ClassifierConfig
from faceedit.nets.content import ContentEncoderConfig
from faceedit.nets.e4e import E4EConfig
from faceedit.nets.mapper import MapperConfig
from faceedit.nets.stylegan2 import StyleGAN2Config
from faceedit.world.attributes import ATTRIBUTE_NAMES
from faceedit.world.dataset import IDENTITY_FEATURES

# Stage order; every stage reads only the outputs of earlier ones.
STAGES: tuple[str, ...] = ("data", "parser", "classifier", "identity", "autoencoder", "content",
                           "directions", "mapper", "bundle")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    resolution: int = 64                 # every image model works at this size
    n_faces: int = 24_000
    shard_size: int = 1000
    validation_faces: int = 64

    # generator (StyleGAN2, capped channels) and its content branch
    style_dim: int = 64
    n_mlp: int = 4
    # StyleGAN2 trains its mapping 100x slower (lr_mlp 0.01); ours must follow the encoded w
    # distribution within the autoencoder stage's ~1-2k steps, so it learns at full rate.
    lr_mlp: float = 1.0
    channel_base: int = 1024
    channel_max: int = 128
    # The two-branch paper fuses 64x64 content features into a 1024 px generator: a grid of 64
    # cells across the face, fine enough that an eye spans several cells. At 64 px the
    # finest grid below the output is 32 (an eye spans ~3 cells), so that is the paper's
    # granularity here; the first run's 16 (an eye in ~1.5 cells) capped fused PSNR at 24 dB.
    content_res: int = 32
    # encoder (e4e IR-SE50)
    encoder_mode: str = "ir_se"
    encoder_channels: tuple[int, ...] = (16, 16, 32, 48)
    # BiSeNet with every reference width divided by this: same architecture and key names,
    # 1/16 of the weights at 4 (0.8M), so the bundle fits its size budget
    parser_width_divisor: int = 4
    # small CNNs (AttributeClassifier architecture): classifier, identity regressor, image D
    classifier_channels: int = 8
    classifier_max_channels: int = 128
    identity_channels: int = 8
    discriminator_channels: int = 8
    latent_discriminator_width: int = 128
    # 32: 24.42 dB fused after 300 s against 23.98 at 16 (same A/B on the v3 autoencoder;
    # 64 runs half the steps and reached 23.04, a 3x3 fusion conv 23.60)
    content_encoder_channels: int = 32
    mapper_layers: int = 3

    # share of the time budget per stage (normalised over the stages still to run) and step caps.
    # Measured on the second bundle: the content stage's fused PSNR still climbs long after
    # its old 444 s (24.9 dB at 2458 steps, 25.8 at 5822), while the parser (IoU 0.434 at 4000
    # steps, 0.447 at 7943) and the classifier (smile MAE 0.05 at 9523) gain little from
    # their second half: that time goes to the content branch.
    share_data: float = 0.03
    share_parser: float = 0.08
    share_classifier: float = 0.10
    share_identity: float = 0.05
    share_autoencoder: float = 0.43
    share_content: float = 0.25
    share_directions: float = 0.04
    share_mapper: float = 0.09
    share_bundle: float = 0.06
    steps_parser: int = 4000
    steps_classifier: int = 6000
    steps_identity: int = 4000
    steps_autoencoder: int = 20_000
    steps_content: int = 20_000
    steps_mapper: int = 6000

    # optimisation
    batch_parser: int = 16
    batch_classifier: int = 32
    batch_autoencoder: int = 12
    batch_content: int = 12
    batch_mapper: int = 16
    lr_parser: float = 1e-3
    lr_classifier: float = 2e-3
    lr_generator: float = 2e-3
    lr_encoder: float = 1e-3
    lr_discriminator: float = 2e-3
    lr_mapping: float = 2e-3
    # 3e-3: 24.86 dB fused after 789 steps against 23.99 at 1e-3 (803 steps), same 240 s A/B
    lr_content: float = 3e-3
    # the content loss plateaus at a constant rate (l1 0.087 from step 3000 to 5500 of the v3
    # run): hold the rate for this share of the stage, then a half-cosine down to floor * rate
    # (A/B, 300 s, width 32: 24.73 dB fused annealed against 24.42 at the constant rate)
    content_anneal_hold: float = 0.5
    content_anneal_floor: float = 0.05
    lr_mapper: float = 5e-4

    # autoencoder losses
    ae_l1: float = 1.0
    ae_feature: float = 1.0
    ae_delta: float = 1e-2
    # the parts and attributes must survive the reconstruction (trainers/autoencoder.py):
    # extra L1 weight on eyes, brows, glasses, nose, mouth and lips; classifier BCE on x'
    ae_parts: float = 4.0
    ae_attribute: float = 1.0
    # e4e's progressive training: delta_i joins the reconstruction at step i * this (before,
    # row i is w0), so w0 must carry the face and the W space stays meaningful
    ae_progressive_steps: int = 200
    ae_adversarial: float = 0.05
    ae_gan_start: int = 1500              # steps of pure reconstruction before the image GAN
    r1_gamma: float = 1.0
    r1_every: int = 16
    # content stage: weight of the feature loss (L1 weight 1). 0.3: 25.18 dB fused after 300 s
    # against 24.73 at 1.0 (both annealed, width 32): the branch exists to restore pixels
    content_feature: float = 0.3

    # directions
    direction_samples: int = 5000
    direction_quantile: float = 0.3       # top / bottom share labelled positive / negative
    calibration_samples: int = 48
    unsupervised_components: int = 8

    # mapper (Latent-to-Latent) losses
    mapper_pool: int = 2048
    mapper_attribute: float = 1.0
    mapper_cycle: float = 1.0
    mapper_identity: float = 1.0
    mapper_neighbourhood: float = 0.1
    mapper_face_identity: float = 0.5
    mapper_active: float = 0.35          # chance that an attribute is edited in a sample

    # housekeeping
    checkpoint_seconds: float = 120.0
    log_seconds: float = 30.0
    latent_avg_samples: int = 10_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith(("share_", "lr_")) and not value > 0:
                raise ValueError(f"TrainConfig.{f.name}: must be > 0, got {value}")
            if f.name.startswith(("steps_", "batch_")) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{f.name}: must be an int >= 1, got {value!r}")
        for name in ("ae_l1", "ae_feature", "ae_delta", "ae_parts", "ae_attribute", "ae_adversarial", "content_feature"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name}: must be >= 0, got {getattr(self, name)}")
        # checked here, not only by annealed_lr, so a bad value fails before the stages before it run
        if not 0 <= self.content_anneal_hold < 1:
            raise ValueError(f"TrainConfig.content_anneal_hold: must be in [0, 1), got {self.content_anneal_hold}")
        if not 0 <= self.content_anneal_floor <= 1:
            raise ValueError(f"TrainConfig.content_anneal_floor: must be in [0, 1], got {self.content_anneal_floor}")
        if self.ae_progressive_steps < 1:
            raise ValueError(f"TrainConfig.ae_progressive_steps: must be >= 1, got {self.ae_progressive_steps}")
        if not 0 < self.direction_quantile <= 0.5:
            raise ValueError(f"TrainConfig.direction_quantile: must be in (0, 0.5], got {self.direction_quantile}")
        if self.n_faces < 2 or self.shard_size < 1:
            raise ValueError(f"TrainConfig.n_faces must be >= 2 and shard_size >= 1, got {self.n_faces}, {self.shard_size}")
        if self.mapper_pool > self.n_faces:
            raise ValueError(f"TrainConfig.mapper_pool: must be <= n_faces={self.n_faces}, got {self.mapper_pool}")
        if self.resolution < 32:
            raise ValueError(f"TrainConfig.resolution: must be >= 32 (the parser's smallest input), got {self.resolution}")
        # the network configs validate everything else; build them once so a bad config fails now
        self.generator_config()
        self.encoder_config()
        self.content_encoder_config()

    def share(self, stage: str) -> float:
        return float(getattr(self, f"share_{stage}"))

    def max_steps(self, stage: str) -> int:
        return int(getattr(self, f"steps_{stage}"))

    # ---- derived network configs ----------------------------------------------------------

    def generator_config(self) -> StyleGAN2Config:
        base = StyleGAN2Config(size=self.resolution, style_dim=self.style_dim, n_mlp=self.n_mlp,
                               lr_mlp=self.lr_mlp, channel_scheme="capped", channel_base=self.channel_base, channel_max=self.channel_max)
        return dataclasses.replace(base, content_res=self.content_res, content_channels=base.channels(self.content_res))

    def encoder_config(self) -> E4EConfig:
        return E4EConfig(num_layers=50, mode=self.encoder_mode, stylegan_size=self.resolution,
                         style_dim=self.style_dim, stage_channels=tuple(self.encoder_channels))

    def parser_config(self) -> BiSeNetConfig:
        return BiSeNetConfig(width_divisor=self.parser_width_divisor)

    def classifier_config(self) -> ClassifierConfig:
        return ClassifierConfig(resolution=self.resolution, attributes=ATTRIBUTE_NAMES,
                                base_channels=self.classifier_channels, max_channels=self.classifier_max_channels)

    def identity_config(self) -> ClassifierConfig:
        """The identity regressor reuses the classifier architecture with one output per
        identity feature (a regression head, trained with MSE on [-1, 1] targets)."""
        return ClassifierConfig(resolution=self.resolution, attributes=IDENTITY_FEATURES,
                                base_channels=self.identity_channels, max_channels=self.classifier_max_channels)

    def discriminator_config(self) -> ClassifierConfig:
        return ClassifierConfig(resolution=self.resolution, attributes=("real",),
                                base_channels=self.discriminator_channels, max_channels=self.classifier_max_channels)

    def content_encoder_config(self) -> ContentEncoderConfig:
        g = self.generator_config()
        return ContentEncoderConfig(resolution=self.resolution, content_res=self.content_res,
                                    out_channels=g.content_channels, base_channels=self.content_encoder_channels)

    def mapper_config(self) -> MapperConfig:
        g = self.generator_config()
        return MapperConfig(n_latent=g.n_latent, style_dim=g.style_dim, attributes=ATTRIBUTE_NAMES,
                            n_layers=self.mapper_layers, space="wplus")


DEFAULT = TrainConfig()

# A few steps of every stage on a handful of tiny faces: proves the pipeline end to end
# (tests, CI) in well under a minute. Quality is meaningless at this size.
SMOKE = TrainConfig(
    resolution=32, n_faces=48, shard_size=16, validation_faces=4,
    style_dim=16, n_mlp=2, channel_base=256, channel_max=32, content_res=16,
    encoder_channels=(16, 16, 16, 16), parser_width_divisor=8, classifier_channels=4, classifier_max_channels=16,
    identity_channels=4,
    discriminator_channels=4, latent_discriminator_width=16, content_encoder_channels=4, mapper_layers=2,
    steps_parser=2, steps_classifier=2, steps_identity=2, steps_autoencoder=4, steps_content=2, steps_mapper=2,
    batch_parser=2, batch_classifier=4, batch_autoencoder=2, batch_content=2, batch_mapper=2,
    ae_gan_start=1, ae_progressive_steps=1, r1_every=2, direction_samples=40, calibration_samples=4, unsupervised_components=4,
    mapper_pool=8, checkpoint_seconds=0.0, log_seconds=0.0, latent_avg_samples=64,
)

PRESETS: dict[str, TrainConfig] = {"default": DEFAULT, "smoke": SMOKE}
