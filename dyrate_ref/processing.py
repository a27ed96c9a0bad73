"""Turning a picture and a question into model inputs, as Hugging Face's LlavaProcessor does.

Image: Pillow only, following transformers' PIL path of CLIPImageProcessor step by step (convert to RGB,
resize the shortest edge, center crop, rescale, normalize) with the same rounding at each step, so the
pixel values agree with transformers' to float32 precision.

Text: the `tokenizers` library on the directory's tokenizer.json; the BOS/EOS names from
tokenizer_config.json (or special_tokens_map.json).
The LLaVA-1.5 prompt is `USER: <image>\n{prompt} ASSISTANT:` and its one `<image>` expands to one
placeholder id per visual token.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from .commands import UserError
from .files import check_input_file
from .model import LlavaConfig

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

# OpenAI CLIP's statistics: CLIPImageProcessor's defaults when preprocessor_config.json leaves them out.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageSettings:
    """preprocessor_config.json, with CLIPImageProcessor's defaults."""
    shortest_edge: int | None = 224  # resize so the short side is this long (aspect kept) ...
    resize_hw: tuple[int, int] | None = None  # ... or straight to (height, width)
    crop_hw: tuple[int, int] = (224, 224)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSettings":
        size = d.get("size", {"shortest_edge": 224})
        shortest, resize_hw = None, None
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = size["shortest_edge"]
        else:
            resize_hw = (size["height"], size["width"])
        crop = d.get("crop_size", {"height": 224, "width": 224})
        crop_hw = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        keep = {k: d[k] for k in ("resample", "rescale_factor", "do_resize", "do_center_crop", "do_rescale",
                                  "do_normalize", "do_convert_rgb") if k in d}
        for k in ("image_mean", "image_std"):
            if k in d:
                keep[k] = tuple(d[k])
        return cls(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop_hw, **keep)


def open_image(path: str, flag: str = "--image") -> Image.Image:
    """Open and fully decode an image file, turning every way it can be unusable into a UserError that
    names `flag` (the option, or a data file's "image" field)."""
    check_input_file(path, flag, "an image file (PNG, JPEG, ...)")
    try:  # a file may list 0 bytes and still not be empty (/proc), or exist and refuse to be read
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror or e}); give a readable image file") from None
    if not first:
        raise UserError(f"{flag} {path} is empty (0 bytes); give a real image file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat both as the same refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{flag} {path} has more pixels than Pillow's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS}); downscale it first") from None
    except UnidentifiedImageError:
        raise UserError(f"{flag} {path} is not an image Pillow can read; give a PNG, JPEG, ... file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{flag} {path} cannot be decoded ({e}); it may be truncated or corrupt") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: anything with transparency is composited onto white first;
    everything else goes through Pillow's own convert("RGB"). EXIF orientation is left alone, as HF does."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shape(h: int, w: int, s: ImageSettings) -> tuple[int, int]:
    """Target (height, width): short side -> shortest_edge, long side scaled and truncated with int(),
    exactly as transformers' get_resize_output_image_size."""
    if s.resize_hw is not None:
        return s.resize_hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s.shortest_edge, int(s.shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(x: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """x [C, H, W] -> [C, ch, cw], zero-padded first where the image is smaller (transformers' rule)."""
    C, H, W = x.shape
    ch, cw = crop_hw
    top, left = (H - ch) // 2, (W - cw) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, H), max(cw, W)
    pad_top, pad_left = -(-(nh - H) // 2), -(-(nw - W) // 2)  # ceil
    padded = x.new_zeros(C, nh, nw)  # [C, nh, nw]
    padded[:, pad_top:pad_top + H, pad_left:pad_left + W] = x
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def pixel_values(img: Image.Image, s: ImageSettings) -> torch.Tensor:
    """A PIL image -> pixel_values [1, 3, h, w] float32."""
    if s.do_convert_rgb:
        img = to_rgb(img)
    if s.do_resize:
        h, w = resize_shape(img.height, img.width, s)
        img = img.resize((w, h), resample=s.resample)  # Pillow works on the uint8 image, as HF's PIL path
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = x.view(img.height, img.width, len(img.getbands())).permute(2, 0, 1)  # [3, H, W] uint8
    if s.do_center_crop:
        x = center_crop(x, s.crop_hw)  # [3, ch, cw]
    x = x.double() * s.rescale_factor if s.do_rescale else x.double()  # HF rescales in float64 ...
    x = x.float()  # ... then stores float32
    if s.do_normalize:
        mean = torch.tensor(s.image_mean, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
        std = torch.tensor(s.image_std, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
        x = (x - mean) / std  # float32 arithmetic, as HF's normalize
    return x[None].contiguous()  # [1, 3, h, w]


# ----------------------------------------------------------------------------------------------------
# Text


class Processor:
    """Tokenizer + image settings of one checkpoint directory."""

    def __init__(self, weights_dir: str, config: LlavaConfig):
        tok_path = os.path.join(weights_dir, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise UserError(f"{weights_dir} has no tokenizer.json; copy it from the checkpoint "
                            "(dyrate_ref reads the fast-tokenizer file only)")
        try:
            self.tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise UserError(f"{tok_path} cannot be read by the tokenizers library ({e})") from None
        tok_cfg = _read_json(os.path.join(weights_dir, "tokenizer_config.json"))
        special = _read_json(os.path.join(weights_dir, "special_tokens_map.json"))
        # each a token's text, or (older files) {"content": text, ...}
        bos, eos = (tok_cfg.get(k, special.get(k)) for k in ("bos_token", "eos_token"))
        bos, eos = (v.get("content") if isinstance(v, dict) else v for v in (bos, eos))
        self.bos_id = self.tokenizer.token_to_id(bos) if bos else None
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None
        # BOS/EOS are added by tokenizer.json's own post-processor, as transformers 5 does: measured on
        # transformers 5.24, its tokenizers ignore tokenizer_config.json's add_bos_token when the
        # post-processor says otherwise. The public llava-hf files agree on both (BOS added, no EOS).

        self.config = config
        self.image_token_id = config.image_token_index
        if self.tokenizer.token_to_id(IMAGE_TOKEN) != self.image_token_id:
            raise UserError(f"{tok_path}: token {IMAGE_TOKEN} has id {self.tokenizer.token_to_id(IMAGE_TOKEN)} "
                            f"but config.json says image_token_index={self.image_token_id}")
        self.image = ImageSettings.from_dict(_read_json(os.path.join(weights_dir, "preprocessor_config.json")))
        if self.image.crop_hw != (config.vision_config.image_size,) * 2:
            raise UserError(f"{weights_dir}: preprocessor_config.json crops to {self.image.crop_hw} but the "
                            f"vision tower expects {config.vision_config.image_size}px images")
        eos_cfg = config.text_config.eos_token_id
        eos_cfg = eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]
        self.stop_ids = {i for i in [self.eos_id, *eos_cfg] if i is not None}

    def prompt_text(self, prompt: str) -> str:
        n = prompt.count(IMAGE_TOKEN)
        if n > 1:
            raise UserError(f"the prompt contains {n} {IMAGE_TOKEN} markers; LLaVA-1.5 takes one image, "
                            f"so use at most one {IMAGE_TOKEN}")
        return f"USER: {prompt} ASSISTANT:" if n == 1 else PROMPT_TEMPLATE.format(prompt=prompt)

    def input_ids(self, prompt: str) -> torch.Tensor:
        """prompt -> input_ids [P] with the single <image> expanded to N placeholder ids."""
        ids = self.tokenizer.encode(self.prompt_text(prompt)).ids
        at = ids.index(self.image_token_id)
        N = self.config.num_image_tokens
        ids = ids[:at] + [self.image_token_id] * N + ids[at + 1:]
        return torch.tensor(ids, dtype=torch.long)  # [P]

    def text_rows(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """[first, end): the rows of input_ids [P] (from input_ids(prompt)) that hold the question's own
        text after the image: what the "mean" and "accumulated" scores average over (pruning.SCORES). The
        template's tokens ("USER:", the newline after <image>, " ASSISTANT:") are the ids the prompt shares
        with the template filled with nothing, from the front and from the back. A prompt with no text
        after the image gets every row after it."""
        ids, empty = input_ids.tolist(), self.input_ids("").tolist()
        front = next((i for i, (a, b) in enumerate(zip(ids, empty)) if a != b), min(len(ids), len(empty)))
        back = next((i for i, (a, b) in enumerate(zip(ids[::-1], empty[::-1])) if a != b), 0)
        after_image = len(ids) - ids[::-1].index(self.image_token_id)
        first, end = max(front, after_image), len(ids) - back
        return (first, end) if first < end else (after_image, len(ids))

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of `text` the vocabulary has no token for: each one is spelt out byte by byte
        (byte-level BPE's single-byte pieces, or sentencepiece's <0x..> byte fallback), so a model trained
        without them has never seen them. The CLI warns about them."""
        out = []
        for ch in dict.fromkeys(text):
            if ord(ch) < 128:  # ASCII is in every vocabulary; a lone "▁"-prefixed piece is not a byte fallback
                continue
            pieces = self.tokenizer.encode(ch, add_special_tokens=False).tokens
            if len(pieces) > 1 and all(len(t) == 1 or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in pieces):
                out.append(ch)
        return out

    def pixel_values(self, img: Image.Image) -> torch.Tensor:
        return pixel_values(img, self.image)  # [1, 3, h, w]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamingDecoder:
    """Turns a growing list of token ids into newly printable text. Decodes the whole answer each time
    and holds back output while it ends in U+FFFD, i.e. inside an unfinished multi-byte character."""

    def __init__(self, processor: Processor):
        self.processor, self.ids, self.printed = processor, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it from the checkpoint") from None
    return d if isinstance(d, dict) else {}
