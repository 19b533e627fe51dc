"""DALI pipeline graphs, run at every training step and evaluation by the loaders of dali_loader.

Each graph takes its encoded images from `reader`, the one thing that differs between the data
formats: a folder's file list read by fn.readers.file, or a sharded dataset's samples read by
cspx (dali_sources) through fn.external_source. The operators after it are the same.

Training mirrors `transforms.TrainTransform`: random-resized-crop (fused with decoding) -> rotate
-> colour jitter -> policy (RandAugment, TrivialAugment or AutoAugment) -> flip + normalize.
The flip is applied last, by crop_mirror_normalize's `mirror`, instead of between rotate and
colour jitter: every later op is either flip-equivariant (colour, posterize, ...) or draws a
sign-symmetric parameter (rotate, shear, translate), so the distribution of augmented images is
the same.

Differences from the torch path, by design or because DALI computes them differently:
- Colour jitter uses `fn.hsv`, which DALI computes as one linear map in RGB (via YIQ):
  saturation blends with luma, exactly as torchvision's adjust_saturation, and value multiplies
  RGB, as adjust_brightness; but hue rotates the chroma plane at constant luma, where
  torchvision shifts HSV hue at constant max(R, G, B): pure red turned by 30 degrees becomes
  (210, 52, 0) here and (255, 126, 0) there. Same direction and range, different colours.
- RandAugment is DALI's auto_aug RandAugment with torchvision's op list, 31 magnitude bins and
  the same ranges (shear 0.3, translate 150/331 of the side, rotate 30 deg, enhance +-0.9,
  posterize 8..4 bits, fill 0). It differs in details: translation is by fractional pixels
  (torchvision truncates to whole pixels); solarize's threshold runs 256..0 instead of 255..0
  (the same integer threshold except at bin 0, where torchvision also inverts pixels equal to
  255); equalize follows OpenCV rather than PIL; sharpness also filters the 1 px border that PIL
  leaves unchanged. Geometric ops sample as aug.randaugment_interpolation says, nearest
  (torchvision's RandAugment default) or bilinear; DALI's CPU warps are about 7x faster nearest.
  TrivialAugment and AutoAugment: see dali_policies.
- Resizing is DALI's antialiased resampling, not PIL's (see docs/dali.md).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.types import DALIDataType, DALIImageType, DALIInterpType

from cspx.data.dali_policies import apply_policy
from cspx.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ra_magnitude_bin

INTERP = {"bilinear": DALIInterpType.INTERP_LINEAR, "bicubic": DALIInterpType.INTERP_CUBIC,
          "nearest": DALIInterpType.INTERP_NN}
# nvJPEG buffers preallocated per decoder thread, in bytes, sized for ImageNet JPEGs (median
# about 110 KB, 400 x 350 px): DALI preallocates two pinned host buffers of HOST_MEMORY_PADDING
# and one device buffer of DEVICE_MEMORY_PADDING per thread. 8 MiB of pinned memory holds the
# Huffman-decoded coefficients of a 2.8 Mpx 4:2:0 image (3 B/px), far above ImageNet's typical
# image; 64 MiB of device memory decodes about 10 Mpx. The rare larger image grows a buffer once
# (nvJPEG keeps it; memory then stays flat). Per training pipeline at 8 threads: 128 MiB pinned
# host memory, 512 MiB device memory (docs/dali.md). The sizes NVIDIA's ResNet-50 example uses
# (134 MiB pinned, 201 MiB device per thread, for the largest ImageNet image) would pin 2.1 GiB
# per pipeline, 17 GiB on an 8-GPU node. Evaluation runs rarely: no preallocation at all.
DEVICE_MEMORY_PADDING = 64 << 20
HOST_MEMORY_PADDING = 8 << 20

MEAN_255 = [255.0 * m for m in IMAGENET_MEAN]  # DALI normalizes uint8 0..255 values
STD_255 = [255.0 * s for s in IMAGENET_STD]


def out_dtype(dtype_name: str):
    return {"float32": DALIDataType.FLOAT, "float16": DALIDataType.FLOAT16}[dtype_name]


def _read(reader: Dict[str, Any], train: bool):
    """(encoded images, int32 (1,) labels or positions) from `reader`: {'source': a batch
    callable (dali_sources)}, or fn.readers.file's settings for a folder's file list."""
    if "source" in reader:
        return fn.external_source(source=reader["source"], batch=True, batch_info=True,
                                  num_outputs=2, dtype=[DALIDataType.UINT8, DALIDataType.INT32])
    return _file_reader(**reader, train=train)


def _file_reader(file_root: str, file_list: str, shard_id: int, num_shards: int, train: bool,
                 shuffle_seed: int):
    kw: Dict[str, Any] = dict(file_root=file_root, file_list=file_list, shard_id=shard_id,
                              num_shards=num_shards, name="Reader", pad_last_batch=True)
    if train:
        # one permutation of the whole list per epoch, identical on every rank (same seed), each
        # rank reading its contiguous slice of it: shards are disjoint within an epoch
        kw.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed,
                  seed=shuffle_seed)
    else:
        kw.update(random_shuffle=False, stick_to_shard=True)
    return fn.readers.file(**kw)


def _darknet_scale(s: float):
    """darknet rand_scale as a DALI node: u ~ U(1, s) (either order), then u or 1/u."""
    lo, hi = min(1.0, s), max(1.0, s)
    u = fn.random.uniform(range=[lo, hi])
    inv = fn.random.coin_flip(probability=0.5)  # int32 0/1, promoted to float below
    return inv / u + (1.0 - inv) * u


@pipeline_def(enable_conditionals=True)
def train_pipeline(reader: Dict[str, Any], mixed: bool, hw_decoder_load: float, img_size: int,
                   scale: Sequence[float], ratio: Sequence[float], interpolation: str,
                   hflip: float, rotate: float, hue: float, saturation: float, exposure: float,
                   ra_ops: int, ra_magnitude: float, ra_interpolation: str, dtype_name: str,
                   channels_last: bool, policy: str = "randaugment"):
    jpegs, labels = _read(reader, train=True)
    # adjust_orientation=False: PIL (the torch path, timm) ignores EXIF orientation too
    dec: Dict[str, Any] = dict(device="cpu", output_type=DALIImageType.RGB,
                               adjust_orientation=False, random_area=list(scale),
                               random_aspect_ratio=list(ratio), num_attempts=10)
    if mixed:
        dec.update(device="mixed", hw_decoder_load=hw_decoder_load,
                   device_memory_padding=DEVICE_MEMORY_PADDING,
                   host_memory_padding=HOST_MEMORY_PADDING)
        labels = labels.gpu()
    images = fn.decoders.image_random_crop(jpegs, **dec)
    images = fn.resize(images, size=[img_size, img_size], interp_type=INTERP[interpolation],
                       antialias=True)
    if rotate > 0:  # the torch path rotates bilinearly, filling with black, keeping the size
        # fn.resize is typed DataNode | Sequence | None (save_attrs adds an output): one here
        images = fn.rotate(images,  # type: ignore[arg-type]
                           angle=fn.random.uniform(range=[-rotate, rotate]),
                           keep_size=True, fill_value=0, interp_type=DALIInterpType.INTERP_LINEAR)
    if hue > 0 or saturation != 1.0 or exposure != 1.0:
        jitter: Dict[str, Any] = {}
        if hue > 0:  # darknet's hue is a fraction of the colour circle; fn.hsv takes degrees
            jitter["hue"] = fn.random.uniform(range=[-hue * 360.0, hue * 360.0])
        if saturation != 1.0:
            jitter["saturation"] = _darknet_scale(saturation)
        if exposure != 1.0:
            jitter["value"] = _darknet_scale(exposure)
        images = fn.hsv(images, **jitter)
    # aug.policy (dali_policies): torchvision's ops and ranges, black fill as torchvision's
    images = apply_policy(images, policy, ra_ops, ra_magnitude_bin(ra_magnitude), img_size,
                          INTERP[ra_interpolation], on_gpu=mixed)
    mirror = fn.random.coin_flip(probability=hflip) if hflip > 0 else 0
    images = fn.crop_mirror_normalize(images, mirror=mirror, mean=MEAN_255, std=STD_255,
                                      dtype=out_dtype(dtype_name),
                                      output_layout="HWC" if channels_last else "CHW")
    return images, labels


@pipeline_def
def eval_pipeline(reader: Dict[str, Any], mixed: bool, img_size: int, resize_size: int,
                  interpolation: str, channels_last: bool):
    """Resize the shorter side to `resize_size`, centre-crop img_size, normalize to float32.
    The reader's second output is each image's position in the split (see DaliEvalLoader)."""
    jpegs, positions = _read(reader, train=False)
    dec: Dict[str, Any] = dict(device="cpu", output_type=DALIImageType.RGB,
                               adjust_orientation=False)
    if mixed:  # PIL (libjpeg) upsamples chroma with the "fancy" filter; nvJPEG does not by default
        dec.update(device="mixed", jpeg_fancy_upsampling=True, device_memory_padding=0,
                   host_memory_padding=0)
        positions = positions.gpu()  # labels are gathered on the device (DaliEvalLoader)
    images = fn.decoders.image(jpegs, **dec)
    shape = fn.peek_image_shape(jpegs, dtype=DALIDataType.FLOAT, adjust_orientation=False)  # HWC
    out_h, out_w = torchvision_resize_shorter(shape[0], shape[1], resize_size)
    images = fn.resize(images, resize_y=out_h, resize_x=out_w, interp_type=INTERP[interpolation],
                       antialias=True, subpixel_scale=False)
    anchor = fn.stack(_center_offset(out_h - img_size), _center_offset(out_w - img_size))
    # fn.resize is typed DataNode | Sequence | None (save_attrs adds an output): one here
    images = fn.slice(images,  # type: ignore[arg-type]
                      anchor, types.Constant(np.array([img_size, img_size], np.float32)),
                      axis_names="HW", normalized_anchor=False, normalized_shape=False,
                      out_of_bounds_policy="pad")  # pad with 0 as torchvision's CenterCrop
    images = fn.crop_mirror_normalize(images, mean=MEAN_255, std=STD_255, dtype=DALIDataType.FLOAT,
                                      output_layout="HWC" if channels_last else "CHW")
    return images, positions


def torchvision_resize_shorter(h, w, size: int):
    """torchvision's Resize(size) output (height, width) as DALI nodes from float nodes h, w: the
    shorter side becomes `size`, the longer one int(size * long / short), truncated. (DALI's own
    resize_shorter rounds the longer side and keeps the exact scale with a sub-pixel ROI.)"""
    w_short = w <= h  # a bool node: 1/0 in arithmetic
    # exact in float32: size * side is an integer below 2^24, and the quotient is rounded once
    out_h = w_short * dmath.floor(size * h / w) + (1.0 - w_short) * size
    out_w = w_short * size + (1.0 - w_short) * dmath.floor(size * w / h)
    return out_h, out_w


def _center_offset(d):
    """torchvision's CenterCrop offset int(round(d / 2)) for an integer-valued float node d: Python
    rounds halves to even (117 -> 58, 119 -> 60), where DALI's crop_pos 0.5 rounds them up, a
    1 px shift that is clearly visible in fine textures."""
    q = dmath.floor(d / 2.0)
    odd_d = d - 2.0 * q
    odd_q = q - 2.0 * dmath.floor(q / 2.0)
    return q + odd_d * odd_q
