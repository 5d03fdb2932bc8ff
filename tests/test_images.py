"""Users' images read as a viewer shows them: each mode against the same image converted independently (numpy),
and the training and FID paths reading through the one reader."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import BACKGROUND, read_image

RNG = np.random.default_rng(0)


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PNG spec: IHDR, one zlib IDAT of unfiltered rows, IEND): colour type 0, 4, 2
    or 6 for 1-4 channels. PIL writes no 16-bit colour PNG, and reads one only to its high byte."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = samples.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff_uint32(samples: np.ndarray) -> bytes:
    """An uncompressed one-strip grayscale TIFF of unsigned 32-bit samples, written by hand (TIFF 6.0 baseline plus
    SampleFormat 1): PIL writes its 32-bit mode only as signed samples."""
    height, width = samples.shape
    data = samples.astype("<u4").tobytes()
    tags = [(256, 4, width), (257, 4, height), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 4, height), (279, 4, len(data)), (339, 3, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + ifd + struct.pack("<I", 0)


def eight_bit(samples: np.ndarray) -> np.ndarray:
    """A 16-bit value v as 8 bits: round(v / 257), evaluated in integers (v + 128) // 257 (ties never occur)."""
    return ((samples.astype(np.int64) + 128) // 257).astype(np.uint8)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing over the background (Porter & Duff "over"), in floating point."""
    a = alpha[..., None].astype(np.float64) / 255
    return rgb.astype(np.float64) * a + np.array(BACKGROUND, np.float64) * (1 - a)


def as_array(image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_a_16_bit_grayscale_png_reads_as_its_8_bit_rendering_not_white(tmp_path):
    samples = np.linspace(0, 65535, 48 * 32).round().astype(np.uint16).reshape(32, 48)
    Image.fromarray(samples).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    ours = as_array(read_image(tmp_path / "scan.png"))
    assert np.array_equal(ours, np.repeat(eight_bit(samples)[..., None], 3, axis=2))
    clipped = np.asarray(Image.open(tmp_path / "scan.png").convert("RGB"))
    assert clipped.mean() > 250 and abs(ours.mean() - 127.5) < 1, f"PIL's convert: mean {clipped.mean()}, ours {ours.mean()}"


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16_bit_colour_pngs_keep_all_16_bits(tmp_path, channels):
    samples = RNG.integers(0, 65536, (20, 24, channels), dtype=np.uint16)
    samples[..., -1] = np.where(np.arange(24) < 12, 65535, samples[..., -1]) if channels != 3 else samples[..., -1]
    (tmp_path / "photo.png").write_bytes(png_16bit(samples))
    ours = as_array(read_image(tmp_path / "photo.png")).astype(np.float64)
    values = eight_bit(samples)
    if channels == 3:
        expected = values
    else:
        colour = values[..., :3] if channels == 4 else np.repeat(values[..., :1], 3, axis=2)
        expected = over_white(colour, values[..., -1])
    assert np.abs(ours - expected).max() <= 1, "8-bit compositing rounds to within one level"
    if channels == 3:
        assert np.array_equal(ours, expected)
        high_byte = np.asarray(Image.open(tmp_path / "photo.png").convert("RGB"))
        assert np.array_equal(high_byte, samples >> 8) and not np.array_equal(high_byte, values), "PIL keeps the high byte"


def test_a_16_bit_pgm_and_32_bit_integer_and_float_tiffs_scale_by_their_full_range(tmp_path):
    gray16 = RNG.integers(0, 65536, (10, 12), dtype=np.uint16)
    (tmp_path / "scan.pgm").write_bytes(b"P5\n12 10\n65535\n" + gray16.astype(">u2").tobytes())
    assert Image.open(tmp_path / "scan.pgm").mode == "I"
    assert np.array_equal(as_array(read_image(tmp_path / "scan.pgm"))[..., 0], eight_bit(gray16))

    gray32 = RNG.integers(0, 2**31, (10, 12)).astype(np.int32)
    Image.fromarray(gray32).save(tmp_path / "deep.tif")
    expected = np.rint(gray32 / (2**31 - 1) * 255).astype(np.uint8)  # PIL writes signed 32-bit TIFF samples
    assert np.array_equal(as_array(read_image(tmp_path / "deep.tif"))[..., 0], expected)

    unsigned = RNG.integers(0, 2**32, (10, 12), dtype=np.uint64).astype(np.uint32)
    (tmp_path / "sensor.tif").write_bytes(tiff_uint32(unsigned))
    expected = np.rint(unsigned / (2**32 - 1) * 255).astype(np.uint8)
    assert np.array_equal(as_array(read_image(tmp_path / "sensor.tif"))[..., 0], expected)

    floats = RNG.random((10, 12)).astype(np.float32) * 1.2 - 0.1  # a little outside [0, 1]: clipped
    Image.fromarray(floats).save(tmp_path / "linear.tif")
    expected = np.rint(np.clip(floats.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(as_array(read_image(tmp_path / "linear.tif"))[..., 0], expected)


def test_transparency_is_composited_over_the_stated_background(tmp_path):
    rgba = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0  # fully transparent rows hide a colour a plain RGB conversion would show
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    ours = as_array(read_image(tmp_path / "icon.png"))
    assert np.abs(ours - over_white(rgba[..., :3], rgba[..., 3])).max() <= 1
    assert (ours[:4] == BACKGROUND).all()

    gray_alpha = RNG.integers(0, 256, (16, 16, 2), dtype=np.uint8)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "mask.png")
    expected = over_white(np.repeat(gray_alpha[..., :1], 3, axis=2), gray_alpha[..., 1])
    assert np.abs(as_array(read_image(tmp_path / "mask.png")) - expected).max() <= 1

    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    indices = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.flatten().tolist())
    paletted.save(tmp_path / "sprite.png", transparency=2)  # palette entry 2 is transparent (tRNS)
    alpha = np.where(indices == 2, 0, 255)
    assert np.array_equal(as_array(read_image(tmp_path / "sprite.png")), over_white(palette[indices], alpha).round())


def test_exif_orientation_cmyk_and_8_bit_modes_read_as_before(tmp_path):
    rgb = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "phone.png", exif=exif)
    assert np.array_equal(as_array(read_image(tmp_path / "phone.png")), np.rot90(rgb, k=-1))

    cmyk = Image.fromarray(RNG.integers(0, 256, (12, 20, 4), dtype=np.uint8), "CMYK")
    cmyk.save(tmp_path / "print.tif")
    assert np.array_equal(as_array(read_image(tmp_path / "print.tif")), np.asarray(cmyk.convert("RGB")))

    for mode in ("L", "1", "RGB"):
        image = Image.fromarray(rgb).convert(mode)
        image.save(tmp_path / f"plain-{mode}.png")
        assert np.array_equal(as_array(read_image(tmp_path / f"plain-{mode}.png")), np.asarray(image.convert("RGB")))
    assert np.array_equal(as_array(read_image((tmp_path / "plain-RGB.png").read_bytes())), rgb), "bytes as a path"
    assert np.array_equal(as_array(read_image(io.BytesIO((tmp_path / "plain-RGB.png").read_bytes()))), rgb)


def scan_and_rendering(folder: Path) -> tuple[Path, Path]:
    """A 16-bit grayscale PNG and, in another folder, the 8-bit PNG a viewer shows for it."""
    samples = (np.add.outer(np.arange(64), np.arange(64)) * 500).astype(np.uint16)
    scan, rendering = folder / "scan" / "dog.png", folder / "rendering" / "dog.png"
    scan.parent.mkdir(parents=True)
    rendering.parent.mkdir(parents=True)
    Image.fromarray(samples).save(scan)
    Image.fromarray(np.repeat(eight_bit(samples)[..., None], 3, axis=2)).save(rendering)
    return scan, rendering


def test_a_16_bit_scan_trains_as_its_8_bit_rendering(tmp_path):
    from common.data import Augment, TrainingImages, find_examples

    scan, rendering = scan_and_rendering(tmp_path)
    augment = Augment(resolution=32, center_crop=True)
    pixels = [TrainingImages(find_examples(instance_data_dir=path.parent, instance_prompt="a dog"), augment, 1, 0)[0]["pixels"]
              for path in (scan, rendering)]
    assert np.array_equal(pixels[0].numpy(), pixels[1].numpy())
    assert float(pixels[0].mean()) < 0.5, "not the near-white image of a clipping conversion"


def test_a_16_bit_scan_in_an_imagefolder_dataset_trains_as_its_8_bit_rendering(tmp_path):
    from common.data import find_examples, open_rgb

    scan, rendering = scan_and_rendering(tmp_path)
    (scan.parent / "metadata.jsonl").write_text('{"file_name": "dog.png", "text": "a dog"}\n')
    [example] = find_examples(instance_data_dir=None, instance_prompt=None, dataset_name=str(scan.parent), caption_column="text")
    assert example.caption == "a dog"
    assert np.array_equal(np.asarray(open_rgb(example)), np.asarray(Image.open(rendering)))


def test_fid_reads_a_16_bit_scan_as_its_rendering_where_clean_fid_reads_white(tmp_path):
    from cleanfid.utils import ResizeDataset

    from common.fid import ViewedResizeDataset

    scan, rendering = scan_and_rendering(tmp_path)
    ours = ViewedResizeDataset(ResizeDataset([str(scan)], mode="clean"))[0]
    assert np.array_equal(ours.numpy(), ResizeDataset([str(rendering)], mode="clean")[0].numpy()), "8-bit files read alike"
    cleanfid_own = ResizeDataset([str(scan)], mode="clean")[0]
    assert float(cleanfid_own.mean()) > 250 and float(ours.mean()) < 200, (float(cleanfid_own.mean()), float(ours.mean()))
