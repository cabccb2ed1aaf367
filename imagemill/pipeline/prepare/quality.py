"""Image statistics computed while the picture is decoded anyway: brightness, contrast, blur
(variance of the Laplacian) and entropy, on the picture as decoded for the models; no model.

Asked for with IMAGEMILL_IMAGE_QUALITY; a fraction of a millisecond per picture.
"""

import numpy as np
from PIL import Image

from imagemill.core.schemas import ImageQuality

# below this many bits of luma entropy a picture is near-uniform (a blank, a single colour, a fade)
LOW_INFORMATION_BITS = 2.0
QUALITY_VERSION = 1  # part of the signature when on: bump when a statistic's definition changes


def image_quality(picture: Image.Image) -> ImageQuality:
    """The statistics of an RGB picture (ITU-R 601 luma, as Pillow's "L")."""
    luma = np.asarray(picture.convert("L"), dtype=np.uint8)
    values = luma.astype(np.float32)
    if values.shape[0] >= 3 and values.shape[1] >= 3:
        laplacian = values[1:-1, :-2] + values[1:-1, 2:] + values[:-2, 1:-1] + values[2:, 1:-1] - 4 * values[1:-1, 1:-1]
        blur = float(laplacian.var())
    else:
        blur = 0.0
    counts = np.bincount(luma.reshape(-1), minlength=256).astype(np.float64)
    shares = counts[counts > 0] / counts.sum()
    entropy = float(-(shares * np.log2(shares)).sum()) if shares.size else 0.0
    return ImageQuality(
        brightness=round(float(values.mean()) / 255, 6),
        contrast=round(float(values.std()) / 255, 6),
        blur=round(blur, 3),
        entropy=round(entropy, 6),
        low_information=entropy < LOW_INFORMATION_BITS,
    )
