"""One photograph: crop it to its field of view, pad it to a square with the disc centred, resize it,
optionally normalise its contrast (Graham, Kaggle 2015); refuse what is not a usable fundus photograph."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ...errors import RetinaLensError
from .fov import FOV, MIN_PEAK, find_fov

MIN_SIDE = 128             # px: smaller than any fundus camera's output; a thumbnail or an icon
MIN_FOV_FRACTION = 0.10    # a field of view under 10% of the frame is a failed photo, not a fundus
_CONTRAST_RIM = 0.98       # contrast mode keeps this share of the radius: the rim's half-lit pixels go


class UnusableFundusError(RetinaLensError):
    """A readable image that is not a usable fundus photograph (black, tiny, field of view too small)."""


def prepare_image(img: Image.Image, size: int = 256, contrast: bool = False) -> Image.Image:
    """Crop `img` to its field of view, pad to a square, resize to size x size.

    Raises UnusableFundusError (a RetinaLensError) with the reason for an image that is not a usable
    fundus photograph."""
    return prepare_with_fov(img, size, contrast)[0]


def prepare_with_fov(img: Image.Image, size: int, contrast: bool) -> tuple[Image.Image, FOV]:
    """`prepare_image` and the field of view it cropped to (the preparation runner reports the crop box)."""
    img = img.convert("RGB")
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        raise UnusableFundusError(f"too small to be a fundus photograph ({width}x{height} px; "
                                  f"need at least {MIN_SIDE} px a side)")
    fov = find_fov(img)
    if fov is None:
        raise UnusableFundusError(f"near-black: no field of view found (brightest 1% of pixels below {MIN_PEAK}/255)")
    if fov.fraction < MIN_FOV_FRACTION:
        raise UnusableFundusError(f"field of view too small ({fov.fraction:.1%} of the image; "
                                  f"need at least {MIN_FOV_FRACTION:.0%})")
    left, top, right, bottom = fov.box
    side = max(right - left, bottom - top)
    scale = size / side
    nw, nh = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    part = img.resize((nw, nh), Image.Resampling.LANCZOS, box=fov.box)
    # Pad so that the disc's centre lands in the middle: a disc cut at the top gets its black above.
    ox = min(max(round(size / 2 - (fov.centre[0] - left) * scale), 0), size - nw)
    oy = min(max(round(size / 2 - (fov.centre[1] - top) * scale), 0), size - nh)
    out = Image.new("RGB", (size, size))
    out.paste(part, (ox, oy))
    if contrast:
        centre = (ox + (fov.centre[0] - left) * scale, oy + (fov.centre[1] - top) * scale)
        out = _graham(out, centre, fov.radius * scale * _CONTRAST_RIM, (ox, oy, ox + nw, oy + nh))
    return out, fov


def _graham(img: Image.Image, centre: tuple[float, float], radius: float, content: tuple[int, int, int, int]) -> Image.Image:
    """4*img - 4*GaussianBlur(img, size/30) + 128 inside the disc, black outside (Graham, Kaggle 2015).

    The local average is taken over the disc only (blur of img*mask / blur of mask), so that the
    black outside does not pull it down near the rim: no bright ring, no need to drop the outer 10%
    of the disc as the original did."""
    from scipy import ndimage as ndi

    size = img.size[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2
    l, t, r, b = content
    inside = np.zeros_like(mask)
    inside[t:b, l:r] = True
    mask &= inside  # the disc where the photo has it: not the padding that stands for the cut-off part
    a = np.asarray(img, dtype=np.float32)
    m = mask.astype(np.float32)
    sigma = size / 30
    num = ndi.gaussian_filter(a * m[..., None], sigma=(sigma, sigma, 0))
    den = ndi.gaussian_filter(m, sigma=sigma)[..., None]
    local = num / np.maximum(den, 1e-6)
    out = np.clip(4 * a - 4 * local + 128, 0, 255) * m[..., None]
    return Image.fromarray(np.rint(out).astype(np.uint8))

