"""Training data: metadata, image/video reading, aspect-ratio buckets, token-length batches, inpaint masks."""

from .buckets import BucketBatchSampler, BucketCollate
from .dataset import DataConfig, DataError, DataHealth, SampleRef, VideoImageDataset
from .metadata import MetadataError, load_metadata

__all__ = [
    "BucketBatchSampler", "BucketCollate", "DataConfig", "DataError", "DataHealth", "MetadataError", "SampleRef",
    "VideoImageDataset", "load_metadata",
]
