"""The per-image augmentation policies of the DALI path (`aug.policy`), run by
dali_pipelines.train_pipeline at every training step: RandAugment, TrivialAugment Wide and
AutoAugment's ImageNet policy, each on nvidia.dali.auto_aug with torchvision's op list,
magnitude ranges and bins, so both loaders run the same policy (the torch path runs torchvision's
T.RandAugment, T.TrivialAugmentWide and T.AutoAugment themselves).

What differs from DALI's stock suites, and why:
- TrivialAugment: torchvision's ranges (brightness, colour, contrast and sharpness from 0, where
  DALI's suite starts at 0.01; solarize thresholds 255..0, where DALI's run 256..0), and
  translations by whole pixels, as torchvision truncates them (DALI translates by fractions).
- TrivialAugment and AutoAugment: shear with torchvision's sign (DALI's shear by m is
  torchvision's by -m). RandAugment keeps DALI's sign: its sign is drawn 50/50, so the
  distribution is the same, and recipes that use it keep their exact DALI images.
- AutoAugment: DALI's `image_net` policy is the TensorFlow TPU policy ("v0", with solarize_add
  and translate), not the table of the AutoAugment paper (Cubuk et al. 2018, arXiv 1805.09501,
  appendix) that torchvision implements; cspx builds torchvision's table from DALI's ops, over
  torchvision's 10 bins and ranges (posterize 8..4 bits, solarize 255..0, enhance +-0.9, rotate
  30 deg, shear 0.3).
- All three: sharpness and equalize on their current operator names (DALI's suites call
  deprecated fn.experimental aliases, which warn at every build); contrast on CPU as one
  fn.contrast pass with PIL's mean-luma centre (DALI's float version costs a float -> uint8 cast,
  about 0.8 ms per 224 px image on CPU); RandAugment's solarize as one lookup table (its
  magnitude is fixed, so is its threshold). Each rebuilt op gives its DALI original's pixels, or,
  where cspx changed a range, torchvision's (tests/test_dali.py and tests/test_policies.py).
Remaining differences from PIL, with the tolerances the tests state: geometric ops sample on
DALI's grid; equalize follows OpenCV; auto-contrast and enhance ops round where PIL truncates.
"""
from __future__ import annotations

import warnings

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.types import DALIDataType

from cspx.data.transforms import RA_BINS

# torchvision's RandAugment translates by up to 150/331 of the image side (DALI defaults 100/224)
RA_MAX_TRANSLATE_REL = 150.0 / 331.0
TA_BINS = 31                  # torchvision TrivialAugmentWide's num_magnitude_bins
TA_MAX_TRANSLATE = 32.0       # pixels, whatever the image size (torchvision)
AA_BINS = 10                  # torchvision AutoAugment's bins
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # PIL's L = 0.299 R + 0.587 G + 0.114 B

# torchvision's AutoAugmentPolicy.IMAGENET: 25 sub-policies of (op, probability, magnitude bin)
AA_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def _rebuilt(enhance_max: float, on_gpu: bool):
    """sharpness, equalize and (CPU) contrast as cspx builds them, enhance ops over
    [0, enhance_max] with a random sign (1 + m: PIL's enhancement factor)."""
    from nvidia.dali.auto_aug import augmentations as aa
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation(mag_range=(0, enhance_max), randomly_negate=True,
                  mag_to_param=aa.sharpness_kernel, param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(mag_range=(0, enhance_max), randomly_negate=True,
                  mag_to_param=aa.shift_enhance_range)
    def contrast(data, factor):
        # PIL's contrast centre: the image's mean luma (ITU-R 601 weights), one float per image
        mean = fn.reductions.mean(data, axis_names="HW")  # (3,) per-channel means
        center = fn.reductions.sum(mean * types.Constant(LUMA), axis_names="C")
        return fn.contrast(data, contrast=factor, contrast_center=center)

    # a GPU pipeline keeps DALI's contrast: a GPU centre cannot be a named argument
    own = {"sharpness": sharpness, "equalize": equalize}
    own["contrast"] = aa.contrast.augmentation((0, enhance_max)) if on_gpu else contrast
    return own


def rand_augment_suite(magnitude_bin: int, on_gpu: bool):
    """DALI's RandAugment suite (torchvision's ops and ranges, translate as a fraction of the
    side), with sharpness, equalize, contrast (CPU) and solarize rebuilt. With `m` fixed the
    solarize threshold is one constant, so solarize is a 256-entry lookup table, one pass over
    uint8 where DALI's builds it from three arithmetic passes and a cast. On CPU these cut
    solarize from 0.50 to 0.06 ms and contrast from 1.3 to 0.15 ms per image."""
    from nvidia.dali.auto_aug import augmentations as aa
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.auto_aug.core import augmentation

    # DALI's solarize: pixels below the bin's threshold stay, the rest become 255 - v
    lo, hi = aa.solarize.mag_range
    threshold = float(np.linspace(lo, hi, RA_BINS)[magnitude_bin])
    table = [v if v < threshold else 255 - v for v in range(256)]

    @augmentation
    def solarize(data, _):
        return fn.lookup_table(data, keys=list(range(256)), values=table, dtype=DALIDataType.UINT8)

    own = _rebuilt(0.9, on_gpu)
    if on_gpu:
        del own["contrast"]  # DALI's RandAugment contrast already has this range
    own["solarize"] = solarize
    suite = rand_augment.get_rand_augment_suite(use_shape=True,
                                                max_translate_rel=RA_MAX_TRANSLATE_REL)
    return [own.get(op.name, op) for op in suite]


def _whole_pixels_x(m):
    return np.array([np.trunc(m), 0.0])  # torchvision translates by int(magnitude) pixels


def _whole_pixels_y(m):
    return np.array([0.0, np.trunc(m)])


def _shear_x(m):
    return np.array([-m, 0.0])  # DALI's shear m is torchvision's -m (same pixels otherwise)


def _shear_y(m):
    return np.array([0.0, -m])


def trivial_augment_suite(on_gpu: bool):
    """torchvision's TrivialAugmentWide op list over 31 bins, from DALI's ops (module doc)."""
    from nvidia.dali.auto_aug import augmentations as aa
    own = _rebuilt(0.99, on_gpu)
    return [
        aa.identity,
        aa.shear_x.augmentation((0, 0.99), True, _shear_x),
        aa.shear_y.augmentation((0, 0.99), True, _shear_y),
        aa.translate_x_no_shape.augmentation((0, TA_MAX_TRANSLATE), True, _whole_pixels_x),
        aa.translate_y_no_shape.augmentation((0, TA_MAX_TRANSLATE), True, _whole_pixels_y),
        aa.rotate.augmentation((0, 135), True),
        aa.brightness.augmentation((0, 0.99), True, aa.shift_enhance_range),
        aa.color.augmentation((0, 0.99), True, aa.shift_enhance_range),
        own["contrast"],
        own["sharpness"],
        aa.posterize.augmentation((8, 2), False, aa.poster_mask_uint8),  # bits kept, rounded
        aa.solarize.augmentation((255, 0), False),
        aa.auto_contrast,
        own["equalize"],
    ]


def auto_augment_policy(on_gpu: bool):
    """torchvision's AutoAugment ImageNet policy (AA_IMAGENET) as a DALI Policy over 10 bins."""
    from nvidia.dali.auto_aug import augmentations as aa
    from nvidia.dali.auto_aug.core import Policy
    own = _rebuilt(0.9, on_gpu)
    ops = {"Posterize": aa.posterize.augmentation((8, 4), False, aa.poster_mask_uint8),
           "Rotate": aa.rotate.augmentation((0, 30), True),
           "Solarize": aa.solarize.augmentation((255, 0), False),
           "AutoContrast": aa.auto_contrast, "Equalize": own["equalize"], "Invert": aa.invert,
           "Color": aa.color.augmentation((0, 0.9), True, aa.shift_enhance_range),
           "Contrast": own["contrast"], "Sharpness": own["sharpness"],
           "ShearX": aa.shear_x.augmentation((0, 0.3), True, _shear_x)}
    with warnings.catch_warnings():  # the table's one probability-0 op, kept as torchvision has it
        warnings.simplefilter("ignore")
        return Policy("torchvision ImageNet", num_magnitude_bins=AA_BINS,
                      sub_policies=[[(ops[name], p, m) for name, p, m in sub]
                                    for sub in AA_IMAGENET])


def apply_policy(images, policy: str, ra_ops: int, ra_magnitude_bin: int, img_size: int,
                 interp, on_gpu: bool):
    """`images` (uint8 HWC, img_size square) through aug.policy; fill 0 (black), as torchvision's
    policies fill on PIL images; `interp` samples the geometric ops."""
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment
    kw = dict(fill_value=0, interp_type=interp)
    if policy == "randaugment" and ra_ops > 0:
        return rand_augment.apply_rand_augment(
            rand_augment_suite(ra_magnitude_bin, on_gpu), images, n=ra_ops, m=ra_magnitude_bin,
            num_magnitude_bins=RA_BINS, shape=[img_size, img_size], **kw)
    if policy == "trivialaugment":
        return trivial_augment.apply_trivial_augment(trivial_augment_suite(on_gpu), images,
                                                     num_magnitude_bins=TA_BINS, **kw)
    if policy == "autoaugment":
        return auto_augment.apply_auto_augment(auto_augment_policy(on_gpu), images, **kw)
    return images
