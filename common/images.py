"""Users' images read as an image viewer shows them: 8-bit RGB whatever the file holds. The one reader of training
images, class images, ZipLoRA examples and the FID and CLIP-score image sets.

PIL's `convert("RGB")` clips wider samples at 255 (a 16-bit grayscale scan becomes nearly white) and drops
transparency (showing whatever colour the transparent pixels happen to carry). Here every sample is scaled by
its format's full range, transparency is shown over BACKGROUND, and the EXIF orientation is applied; modes of
8-bit colour (L, P, CMYK, YCbCr, ...) convert as PIL converts them.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as most viewers and web pages show them
SIXTEEN_BIT_MAX = 65535
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types PIL decodes to 8 bits per sample when they hold 16 (it keeps the high byte): RGB, grey + alpha, RGBA
PNG_WIDE_COLOUR_TYPES = (2, 4, 6)
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa")


def read_image(source) -> Image.Image:
    """The image in `source` (a path, the file's bytes, a binary file object, or an open PIL image) as 8-bit RGB,
    as a viewer shows it (the module's docstring says how). PIL's errors for a broken file name the path."""
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        return viewed_as_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            header = file.read(26)
        if _is_wide_colour_png(header):
            return viewed_as_rgb(_wide_png(Path(source).read_bytes()))
        opened = Image.open(source)
    else:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else source.read()
        if _is_wide_colour_png(data):
            return viewed_as_rgb(_wide_png(data))
        opened = Image.open(io.BytesIO(data))
    with opened as image:  # the range is read before exif_transpose, whose copy drops a TIFF's tags
        return viewed_as_rgb(ImageOps.exif_transpose(image), sample_range(image))


def _is_wide_colour_png(data: bytes) -> bool:
    """A PNG of 16-bit colour samples (its IHDR chunk, which the format puts first, says so)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = struct.unpack(">BB", data[24:26])
    return bit_depth == 16 and colour_type in PNG_WIDE_COLOUR_TYPES


def _wide_png(data: bytes) -> Image.Image:
    """A 16-bit RGB, RGBA or grey + alpha PNG with every sample scaled to 8 bits, decoded by torchvision (which
    keeps all 16 bits, where PIL keeps only the high byte), with its EXIF orientation applied."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_png

    samples = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    pixels = to_8bit(samples.permute(1, 2, 0).numpy().astype(np.float64), SIXTEEN_BIT_MAX)
    return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels, {2: "LA", 3: "RGB", 4: "RGBA"}.get(pixels.shape[2], "L"))


def to_8bit(samples, full_range: float):
    """Samples on [0, full_range] as 8-bit values round(v / full_range * 255): a 16-bit value v becomes
    round(v / 257); anything outside the range is clipped."""
    import numpy as np

    return np.rint(np.clip(samples, 0, full_range) * (255 / full_range)).astype(np.uint8)


def sample_range(image) -> float:
    """The full range of an integer or float image's samples: 65535 for PIL's 16-bit modes and for its 32-bit
    integer mode `I` (which PIL also uses for 16-bit PGM files, scaled to 0-65535), except where a TIFF declares
    32-bit samples (2^32 - 1, or 2^31 - 1 if signed); 1.0 for float samples (mode F), as float images are
    stored."""
    if image.mode == "F":
        return 1.0
    tags = getattr(image, "tag_v2", {})
    if image.mode == "I" and tags.get(258) in (32, (32,)):  # TIFF BitsPerSample
        return 2**31 - 1 if tags.get(339) in (2, (2,)) else 2**32 - 1  # SampleFormat 2: signed integers
    return SIXTEEN_BIT_MAX


def viewed_as_rgb(image, full_range: float | None = None) -> Image.Image:
    """A PIL image of any mode as the 8-bit RGB image a viewer shows: wide samples scaled by their full range
    (`sample_range` unless given), transparency composited over BACKGROUND, other modes converted by PIL."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        full_range = full_range or sample_range(image)
        samples = np.asarray(image)
        if image.mode == "I" and full_range == 2**32 - 1:
            samples = samples.view(np.uint32)  # PIL holds unsigned 32-bit TIFF samples in a signed mode
        return Image.fromarray(to_8bit(samples.astype(np.float64), full_range), "L").convert("RGB")
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_alpha(source) -> Image.Image | None:
    """The transparency of the image in `source` (a path or the file's bytes) as an 8-bit "L" image, oriented as
    `read_image` orients the picture; None when the image has none (kohya's --alpha_mask reads the same channel)."""
    from PIL import Image, ImageOps

    opened = Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(bytes(source)))
    with opened as image:
        image = ImageOps.exif_transpose(image)
        if image.mode not in TRANSPARENT_MODES and "transparency" not in image.info:
            return None
        return image.convert("RGBA").getchannel("A")


def read_mask_file(path: Path) -> Image.Image:
    """A mask image as an 8-bit "L" image: its red channel (a grayscale mask's only one), as kohya's masked loss reads
    a conditioning image; white trains, black is ignored."""
    return read_image(path).getchannel("R")
