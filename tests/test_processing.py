"""processing.py: pixel values against transformers' CLIPImageProcessor (PIL path) on real photographs, odd
image modes and the branches they do not reach; the prompt template's literal text; the streaming decoder.

Tolerance 1e-5: both sides do the same uint8 Pillow resize and the same float64 rescale / float32
normalize, so they should agree to float32 rounding; 1e-5 is the issue's bound.
"""

import json

import pytest
import torch
from PIL import Image

from dyrate_ref.loading import DEFAULT_WEIGHTS, load_model
from dyrate_ref.processing import ImageSettings, Processor, StreamingDecoder, pixel_values
from helpers import hf_config, make_checkpoint, noise_image, tokenizer

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


def assert_pixels_match_hf(images: dict, settings: dict):
    for name, img in images.items():
        ours = pixel_values(img, ImageSettings.from_dict(settings))
        theirs = hf_pixels(img, settings)
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("settings", [LLAVA_15, SMALL, RECT], ids=["llava15-336", "small-40", "resize-hw"])
def test_real_photographs(settings):
    assert_pixels_match_hf(photos(), settings)


@pytest.mark.parametrize("settings", [LLAVA_15, SMALL], ids=["llava15-336", "small-40"])
def test_odd_modes_and_shapes(settings):
    assert_pixels_match_hf(odd_images(), settings)


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    px = pixel_values(img, ImageSettings.from_dict(SMALL))
    white = (torch.tensor(1.0) - torch.tensor(LLAVA_15["image_mean"])) / torch.tensor(LLAVA_15["image_std"])
    torch.testing.assert_close(px[0, :, 20, 20], white, atol=1e-5, rtol=0)


BASE = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.mark.parametrize("settings, size", [
    ({**BASE, "do_resize": False}, (45, 37)),  # no resize: the crop alone
    ({**BASE, "do_resize": False}, (20, 13)),  # no resize, smaller than the crop: padded as HF pads
    ({**BASE, "do_center_crop": False, "size": {"shortest_edge": 31}}, (47, 33)),  # odd sizes, no crop
    (BASE, (17, 9)),  # smaller than the crop before the resize
    ({**BASE, "crop_size": {"height": 31, "width": 27}}, (63, 41)),  # odd, non-square crop
], ids=["no-resize", "no-resize-small", "no-crop-odd", "upscaled", "odd-crop"])
def test_preprocessing_branches_equal_transformers(settings, size):
    img = noise_image(*size, seed=sum(size))
    ours = pixel_values(img, ImageSettings.from_dict(settings))
    theirs = hf_pixels(img, settings)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# The prompt template


def test_the_prompt_template_is_llava_15s_literal_text():
    from dyrate_ref.processing import PROMPT_TEMPLATE
    assert PROMPT_TEMPLATE == "USER: <image>\n{prompt} ASSISTANT:"  # llava-hf's LLaVA-1.5 model card
    proc = Processor(DEFAULT_WEIGHTS, load_model(DEFAULT_WEIGHTS).config)
    assert proc.prompt_text("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"
    assert proc.prompt_text("<image> here") == "USER: <image> here ASSISTANT:"  # a placed <image> is kept where it is
    ids = proc.input_ids("What is it?")
    N = proc.config.num_image_tokens
    want = proc.tokenizer.encode("USER: <image>\nWhat is it? ASSISTANT:").ids
    at = want.index(proc.image_token_id)
    assert ids.tolist() == want[:at] + [proc.image_token_id] * N + want[at + 1:]


def test_the_template_equals_a_shipped_chat_template(tmp_path):
    """Where a checkpoint ships a chat template (llava-hf's LLaVA-1.5 files do), transformers renders a
    one-image user turn to our literal text."""
    from transformers import AutoProcessor
    d = tmp_path / "w"
    make_checkpoint(str(d), hf_config(text=dict(num_hidden_layers=2)))
    # The chat template llava-hf's LLaVA-1.5 checkpoints ship (written by transformers' LLaVA conversion:
    # role in capitals and ': ', the images as '<image>\n', then each text and a space, then 'ASSISTANT:').
    template = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
                "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
                "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
                "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    proc = AutoProcessor.from_pretrained(str(d))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                                    add_generation_prompt=True)
    ours = Processor(str(d), load_model(str(d)).config).prompt_text("What is it?")
    assert text == ours


def test_streaming_decoder_holds_back_half_a_character():
    """Multi-byte characters arrive whole: fed the tokens of '東京 café' one at a time, every push returns
    whole characters, and together they are the text."""
    from tokenizers import Tokenizer

    class Proc:  # the one method StreamingDecoder uses
        def __init__(self, tok: Tokenizer):
            self.tok = tok

        def decode(self, ids):
            return self.tok.decode(ids)
    tok = tokenizer()
    text = " 東京 café naïve"
    ids = tok.encode(text).ids
    dec = StreamingDecoder(Proc(tok))
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) == tok.decode(ids)
    assert all("\ufffd" not in o for o in outs)
    # The byte-level tokenizer does split these characters: some pushes return nothing.
    assert sum(o == "" for o in outs) >= 1
