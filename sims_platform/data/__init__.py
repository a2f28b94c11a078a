"""Data: real images from a source, and the sharded synthetic sets the generate stage writes."""

from sims_platform.data.errors import DataError
from sims_platform.data.images import LabeledImages
from sims_platform.data.shards import ShardError, ShardWriter, iter_shards, read_manifest, read_shard, read_shards
from sims_platform.data.index import SourceIndex
from sims_platform.data.sources import load_images
from sims_platform.data.split import class_subset, holdout_split, split_images, training_indices
from sims_platform.data.stream import ShardStream

__all__ = ["DataError", "LabeledImages", "ShardError", "ShardStream", "ShardWriter", "SourceIndex", "class_subset", "holdout_split",
           "iter_shards", "load_images", "read_manifest", "read_shard", "read_shards", "split_images",
           "training_indices"]
