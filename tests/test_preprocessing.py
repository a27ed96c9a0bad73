"""Pixel values vs transformers' CLIPImageProcessor (PIL path) on real photographs and odd image modes.

Tolerance 1e-5: both sides do the same uint8 Pillow resize and the same float64 rescale / float32
normalize, so they should agree to float32 rounding; 1e-5 is the issue's bound.
"""

import pytest
import torch
from PIL import Image

from dyrate_ref.processing import ImageSettings, pixel_values

LLAVA_15 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3,
            "rescale_factor": 0.00392156862745098, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
SMALL = {**LLAVA_15, "size": {"shortest_edge": 40}, "crop_size": {"height": 40, "width": 40}}
RECT = {**LLAVA_15, "size": {"height": 30, "width": 50}, "crop_size": {"height": 24, "width": 24}}


def hf_pixels(img, settings):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(**settings)(images=img, return_tensors="pt")["pixel_values"]


def photos():
    from skimage import data
    return {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}


def odd_images():
    g = torch.Generator().manual_seed(0)
    rgb = Image.frombytes("RGB", (97, 61), torch.randint(0, 256, (61 * 97 * 3,), generator=g,
                                                        dtype=torch.uint8).numpy().tobytes())
    rgba = rgb.convert("RGBA")
    alpha = Image.frombytes("L", rgb.size, torch.randint(0, 256, (61 * 97,), generator=g, dtype=torch.uint8).numpy().tobytes())
    rgba.putalpha(alpha)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    i16 = Image.frombytes("I;16", (40, 30), torch.randint(0, 2 ** 16, (40 * 30,), generator=g,
                                                          dtype=torch.int32).to(torch.int16).numpy().tobytes())
    return {
        "RGBA": rgba, "P": pal, "P+transparency": pal_t, "L": rgb.convert("L"), "LA": rgba.convert("LA"),
        "I;16": i16, "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"),
        "very-wide": rgb.resize((1000, 20)), "very-tall": rgb.resize((15, 700)), "tiny": rgb.resize((3, 2)),
    }


@pytest.mark.parametrize("settings", [LLAVA_15, SMALL, RECT], ids=["llava15-336", "small-40", "resize-hw"])
def test_real_photographs(settings):
    for name, img in photos().items():
        ours = pixel_values(img, ImageSettings.from_dict(settings))
        theirs = hf_pixels(img, settings)
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("settings", [LLAVA_15, SMALL], ids=["llava15-336", "small-40"])
def test_odd_modes_and_shapes(settings):
    for name, img in odd_images().items():
        ours = pixel_values(img, ImageSettings.from_dict(settings))
        theirs = hf_pixels(img, settings)
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max().item() <= 1e-5, name


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    px = pixel_values(img, ImageSettings.from_dict(SMALL))
    white = (torch.tensor(1.0) - torch.tensor(LLAVA_15["image_mean"])) / torch.tensor(LLAVA_15["image_std"])
    torch.testing.assert_close(px[0, :, 20, 20], white, atol=1e-5, rtol=0)
