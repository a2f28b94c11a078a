"""A step's data: the real splits (training, classifier, reference), the model space (the encoder) and the
training sets a base or aux reads, each loaded once when first asked for."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from sims_platform.config.schema import Loop, PipelineConfig
from sims_platform.data import LabeledImages, class_subset, load_images, read_shards, split_images
from sims_platform.encoders import Encoder, build_encoder
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout


@dataclass
class RunData:
    """The data of iteration `iteration` as `cfg` (a loop's view in a loop) and `layout` (likewise) see it."""

    cfg: PipelineConfig
    layout: RunLayout
    iteration: int
    device: torch.device
    loop: Loop | None = None

    @cached_property
    def _held_out_split(self) -> tuple[LabeledImages, LabeledImages]:
        d = self.cfg.data
        return split_images(load_images(d), d.holdout_fraction, d.holdout_seed)

    @cached_property
    def labelled(self) -> LabeledImages:
        """The whole training split, what classifiers train on: all of data.path when data.reference_path names a
        separate reference set, else everything but the held-out part."""
        d = self.cfg.data
        return load_images(d) if d.reference_path is not None else self._held_out_split[0]

    @cached_property
    def real(self) -> LabeledImages:
        """The real images the diffusion models train on: the training split, less what data.class_fractions
        drops (the only real data training sees)."""
        d, train = self.cfg.data, self.labelled
        if not d.class_fractions:
            return train
        keep = class_subset(train.labels, d.class_fractions, d.holdout_seed)
        return LabeledImages(train.images[keep], train.labels[keep])

    @cached_property
    def reference(self) -> LabeledImages:
        """The FID / precision / recall reference images, never trained on: every image of data.reference_path,
        else the held-out part of data.path."""
        d = self.cfg.data
        return load_images(d.reference_data()) if d.reference_path is not None else self._held_out_split[1]

    @cached_property
    def encoder(self) -> Encoder:
        return build_encoder(self.cfg.encoder, self.cfg.data.channels, self.device)

    @cached_property
    def real_encoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real data in model space: pixels as they are, latents from the encode stage's shards."""
        if self.cfg.encoder.kind == "pixel":
            return self.encoder.encode(self.real.images), self.real.labels
        if not fsio.exists(self.layout.done_marker(0, "encode")):
            raise FileNotFoundError(f"latent training data not found at {self.layout.encoded}: run "
                                    "`sims stage encode` first (the pipeline runner does)")
        x, y, _ = read_shards(self.layout.encoded)
        return x, y

    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the model space."""
        res = self.encoder.resolution(self.cfg.data.resolution)
        return self.encoder.channels, res, res

    def real_training_data(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
        """The real training split in model space and the URI it came from (lineage)."""
        real_x, real_y = self.real_encoded
        return real_x, real_y, {"real": self.real_uri() if self.cfg.encoder.kind == "pixel" else self.layout.encoded}

    def train_data_mode(self) -> str:
        """What iteration k > 0 trains its base on: real, real+synthetic or synthetic (loop.train_data in a loop)."""
        return self.cfg.loop.train_data if self.loop is not None and self.cfg.loop else self.cfg.iterations.train_data

    def feed_sources(self) -> dict[str, str]:
        """The feed shard sets iteration k's base trains on, oldest first (lineage name -> URI): the previous
        iteration's feed; in a loop with loop.accumulate, every earlier generation's feed of that loop."""
        k = self.iteration
        if k == 0 or self.train_data_mode() == "real":
            return {}
        first = 0 if self.loop is not None and self.cfg.loop is not None and self.cfg.loop.accumulate else k - 1
        return {f"feed_iter_{j}": self.layout.shards(j, "feed") for j in range(first, k)}

    def feed_samples(self) -> int:
        """|D_p|, the feed stage's sample count: iterations.feed_samples, or in a loop its fraction of |D_r| (the
        real training split as the base trains on it)."""
        if self.loop is None:
            return self.cfg.iterations.feed_samples
        return max(1, round(self.loop.fraction * len(self.real_encoded[1])))

    def base_training_data(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
        """Iteration k's base training set and the URIs it came from (lineage): the real training split and/or
        the feed shard sets of feed_sources, concatenated in that order."""
        real_x, real_y, sources = self.real_training_data()
        feeds = self.feed_sources()
        if not feeds:
            return real_x, real_y, sources
        parts = [read_shards(uri)[:2] for uri in feeds.values()]
        feed_x, feed_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        if self.train_data_mode() == "synthetic":
            return feed_x, feed_y, feeds
        if real_x.shape[1] == 2 * feed_x.shape[1]:  # encoded posteriors (mean, std): a feed sample is exact
            feed_x = torch.cat([feed_x, torch.zeros_like(feed_x)], dim=1)
        return torch.cat([real_x, feed_x]), torch.cat([real_y, feed_y]), feeds | sources

    def real_uri(self) -> str:
        d = self.cfg.data
        return d.path if d.path else f"sklearn://load_digits?resolution={d.resolution}"
