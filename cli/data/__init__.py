"""Datasets (``sets.py``, ``folders.py``, ``common.py``) and the device data provider
(``device.py``).

Datasets are loaded once into CPU uint8 tensors (`ImageSet`). The training set then moves to the
device once, and `DeviceDataProvider` cuts every micro-batch from it on the device: random
resized crop, flips and colour jitter drawn *per sample*, and per-sample patch masks.

Randomness is counter-based, so the stream is a pure function of (seed, rank, position):
* the sample order of epoch `e` is `randperm(N)` from a generator keyed by (seed, e), the same on
  every rank; rank r takes the slice `perm[r::world_size]` (cut to equal length), like
  `DistributedSampler`, so the ranks see disjoint samples within an epoch;
* the augmentation and mask parameters of micro-batch `n` come from a CPU generator keyed by
  (seed, rank, n). They are drawn on the CPU (identical on every device type) and reach the
  device in one small transfer.
Hence `state_dict()` is a few integers, the same on every rank, and any rank can restore the
stream from rank 0's checkpoint.
"""

from ..errors import DatasetError
from .common import (
    _VAL_KEY,
    DEFAULT_ROOT,
    EMBEDDED_TRAIN_SOURCES,
    EMBEDDED_VAL_SOURCES,
    FACES,
    FACES_TRAIN,
    IMAGE_SUFFIXES,
    SYNTHETIC_CLASSES,
    ImageSet,
    _generator,
    num_masked_patches,
)
from .device import (
    BuiltinData,
    DeviceDataProvider,
    ImageData,
    build_image_data,
    build_val_batches,
    pixel_mask,
)
from .folders import _take_rows_
from .sets import build_datasets, synthetic_images

__all__ = [
    "DEFAULT_ROOT",
    "EMBEDDED_TRAIN_SOURCES",
    "EMBEDDED_VAL_SOURCES",
    "FACES",
    "FACES_TRAIN",
    "IMAGE_SUFFIXES",
    "SYNTHETIC_CLASSES",
    "_VAL_KEY",
    "BuiltinData",
    "DatasetError",
    "DeviceDataProvider",
    "ImageData",
    "ImageSet",
    "_generator",
    "_take_rows_",
    "build_datasets",
    "build_image_data",
    "build_val_batches",
    "num_masked_patches",
    "pixel_mask",
    "synthetic_images",
]
