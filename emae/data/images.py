"""Reading one image file as 8-bit RGB, whatever mode it was stored in.

PIL's `convert("RGB")` is right for most modes, not for these:
- 16-bit grayscale (modes I;16*, I): PIL clips values above 255, so nearly every pixel of a
  16-bit PNG or TIFF becomes white; here the 0..65535 range is scaled to 0..255 (round(v / 257)).
- transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a transparent colour): PIL drops alpha and
  shows whatever colour sits under transparent pixels; here the image is composited on black
  (colour x alpha), so a transparent pixel is black whatever its hidden colour.
CMYK uses PIL's conversion (R = (255 - C)(255 - K) / 255, ...); an embedded ICC profile is not applied.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from emae.errors import EmaeError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see the module docstring for the modes PIL gets wrong)."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB; an unreadable file is an EmaeError naming it."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
            return to_rgb(image)
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise EmaeError(f"{path}: cannot read image: {err}") from None


def probe(path: str) -> tuple[str, int, int]:
    """Decode `path` completely enough to find any damage; returns (mode, width, height).

    JPEGs are decoded at 1/8 scale (`draft`): every compressed byte is still read, so a truncated
    or damaged file still fails, at a fraction of the cost. Raises what PIL raises.
    """
    with open(path, "rb") as handle:
        image = Image.open(handle)
        mode, (width, height) = image.mode, image.size
        if image.format == "JPEG":
            image.draft(image.mode, (1, 1))
        image.load()  # a truncated or damaged file fails here
        to_rgb(image)
    return mode, width, height
