"""Load an unmodified llava-hf directory: config.json + safetensors weights (one file or shards).

Three weight-key layouts are in circulation; one small rename table maps all of them onto model.py's
names. Loading is strict: a tensor that is missing, unexpected or of the wrong shape is an error that
names it. Tensors are read one at a time straight from the file into their final place (no mmap, no
second copy of the checkpoint), so peak memory stays close to the checkpoint's own size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import fields

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .commands import DEFAULT_WEIGHTS, Progress, UserError  # noqa: F401  (DEFAULT_WEIGHTS re-exported)
from .files import check_input_file
from .model import (ACTIVATIONS, LLAVA_DEFAULT_VISION, LlavaConfig, LlavaForConditionalGeneration, TextConfig,
                    VisionConfig)
from .predictor import FEATURES, RatePredictor

# checkpoint key prefix -> model.py prefix. The first matching prefix wins, so the longer, more specific
# prefixes come first.
KEY_RENAMES = [
    # (b) transformers 4.5x save_pretrained
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "model."),
    # (a) the public llava-hf hub files
    ("vision_tower.vision_model.", "vision_tower."),
    # (a) and (c) transformers 5.x save_pretrained
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    # names that are already ours: (c) vision_tower.*, all layouts' projector, (b) lm_head
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
]

# Buffers some checkpoints carry that the model recomputes instead (CLIP's position ids, old Llama's
# RoPE frequencies): accepted and skipped.
UNUSED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rename_key(key: str) -> str | None:
    """Checkpoint key -> model.py parameter name (None for a known unused buffer)."""
    if key.endswith(UNUSED_SUFFIXES):
        return None
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown prefix: reported as unexpected by the caller


def checkpoint_key(name: str) -> str:
    """model.py parameter name -> the key transformers 5.x's save_pretrained writes (layout c): the
    language model's names gain a "language_model." prefix, the rest are already the same."""
    return "language_model." + name if name.startswith(("model.", "lm_head.")) else name


# ----------------------------------------------------------------------------------------------------
# config.json


def hub_cache_dirs() -> list[str]:
    """Where a Hugging Face hub cache may be, in the order huggingface_hub looks: $HF_HUB_CACHE,
    $HF_HOME/hub, ~/.cache/huggingface/hub."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        out.append(os.path.join(os.environ["HF_HOME"], "hub"))
    out.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(out))


def resolve_weights(spec: str, flag: str = "--weights") -> str:
    """A --weights value -> a checkpoint directory. A path that exists is itself. A hub id
    ("llava-hf/llava-1.5-7b-hf") is looked up in the local hub cache, never downloaded: its
    models--org--name/snapshots/<revision> folder, the revision refs/main names (else the only one, or
    the newest), whose files are symlinks into blobs/ that open like files. Not found: a UserError saying
    where it looked."""
    if os.path.exists(spec) or spec.count("/") != 1 or spec.startswith((".", "/")) or not all(spec.split("/")):
        return spec
    folder = "models--" + spec.replace("/", "--")
    looked = []
    for cache in hub_cache_dirs():
        repo = os.path.join(cache, folder)
        looked.append(repo)
        snapshots = os.path.join(repo, "snapshots")
        if not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo, "refs", "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                revision = f.read().strip()
            if os.path.isdir(os.path.join(snapshots, revision)):
                return os.path.join(snapshots, revision)
        revisions = sorted(os.listdir(snapshots), key=lambda r: os.path.getmtime(os.path.join(snapshots, r)))
        if revisions:
            return os.path.join(snapshots, revisions[-1])
    raise UserError(f"{flag} {spec}: no such folder, and no copy of hub model {spec} in the local Hugging Face cache "
                    f"(looked in {', '.join(looked)}); nothing is downloaded: fetch it with huggingface-cli, or give "
                    "the checkpoint's folder")


def config_from_dict(d: dict) -> LlavaConfig:
    """Read a llava-hf config.json (any transformers version) into the dataclasses."""
    vision = d.get("vision_config")
    vision = VisionConfig(**LLAVA_DEFAULT_VISION) if vision is None else _pick(VisionConfig, vision)
    text = dict(d.get("text_config") or {})
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "rope_theta" in rope and "rope_theta" not in text:
        text["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (LLaVA-1.5 uses plain RoPE)")
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = d["tie_word_embeddings"]
    top = _pick(LlavaConfig, {k: v for k, v in d.items() if k not in ("vision_config", "text_config")})
    text = _pick(TextConfig, text)
    for act in (vision.hidden_act, text.hidden_act, top.projector_hidden_act):
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
    layer = top.vision_feature_layer
    layer = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
    return LlavaConfig(**{**{f.name: getattr(top, f.name) for f in fields(LlavaConfig)},
                          "vision_config": vision, "text_config": text,
                          "vision_feature_layer": layer})


def _pick(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def read_config(weights_dir: str, flag: str = "--weights") -> LlavaConfig:
    """The checkpoint's config.json; `flag` names the option that gave the folder in every refusal."""
    if not os.path.exists(weights_dir):
        raise UserError(f"{flag} {weights_dir} does not exist; give a llava-hf checkpoint's folder")
    if not os.path.isdir(weights_dir):
        raise UserError(f"{flag} {weights_dir} is a file, not a folder; give the checkpoint's folder")
    path = os.path.join(weights_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {weights_dir} has no config.json; it is not a llava-hf checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a JSON object; restore the checkpoint's config.json")
    try:
        return config_from_dict(raw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} does not describe a LLaVA model this code can run: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Weight files are read with safetensors.safe_open (never torch.load or pickle): the header first, to
# check every name and shape before any data is read, then one tensor at a time.


def open_weights(path: str):
    """safe_open(path), or a UserError that names the file (truncated, not safetensors, a bad header)."""
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or not a safetensors file ({e}); download or convert it again") from None


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a weight file's header alone."""
    with open_weights(path) as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def weight_files(weights_dir: str) -> list[str]:
    single = os.path.join(weights_dir, "model.safetensors")
    index = os.path.join(weights_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a valid safetensors index; restore it") from None
        files = [os.path.join(weights_dir, n) for n in names]
        for p in files:
            if not os.path.isfile(p):
                raise UserError(f"shard {p} named in {index} is missing; download it too")
        return files
    pickles = [n for n in os.listdir(weights_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise UserError(
            f"{weights_dir} has only pickle weights ({pickles[0]}); dyrate_ref loads safetensors only, "
            "because unpickling can run arbitrary code: convert them to model.safetensors first")
    raise UserError(f"{weights_dir} has no model.safetensors or model.safetensors.index.json")


# Every file of a checkpoint directory that loading reads besides its weights.
CHECKPOINT_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "model.safetensors.index.json")


def weight_inputs(weights_dir: str) -> list[str]:
    """The files of weights_dir a run reads (config, tokenizer, preprocessor and every weight file that
    exists): what an output may never overwrite (files.check_outputs)."""
    files = [os.path.join(weights_dir, n) for n in CHECKPOINT_FILES]
    if os.path.isdir(weights_dir):
        files += [os.path.join(weights_dir, n) for n in os.listdir(weights_dir) if n.endswith(".safetensors")
                  and n.startswith("model")]
    return files


def load_model(weights_dir: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """Build the model from `weights_dir`, reading each tensor once, casting it to `dtype` and putting
    it on `device`. Strict: every parameter must come from the checkpoint, with the right shape."""
    cfg = config or read_config(weights_dir)
    files = weight_files(weights_dir)
    with torch.device("meta"):  # no memory for the random init that would be overwritten anyway
        model = LlavaForConditionalGeneration(cfg)
    expected = dict(model.named_parameters())  # a tied lm_head shares embed_tokens and is not listed
    tied = cfg.text_config.tie_word_embeddings

    # Pass 1, headers only: every name and shape is checked before a single byte of data is read.
    plan = []  # (path, checkpoint key, model name)
    seen = set()
    for path in files:
        for key, shape in read_shapes(path).items():
            name = rename_key(key)
            if name is None or (tied and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise UserError(f"{path}: unexpected tensor {key}; this is not a LLaVA-1.5 checkpoint "
                                "matching its config.json")
            want = tuple(expected[name].shape)
            if shape != want:
                raise UserError(f"{path}: tensor {key} has shape {shape} but config.json "
                                f"implies {want}; config and weights do not belong together")
            if name in seen:
                raise UserError(f"{path}: tensor {key} appears twice in the checkpoint")
            seen.add(name)
            plan.append((path, key, name))
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"{weights_dir}: tensor {missing[0]} is missing from the checkpoint"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    # Pass 2: read, cast and place each tensor, one at a time. Each is copied out of the file's memory
    # map, which is closed before the next: a mapped page stays resident while its map is open, so one map
    # for the whole file would hold every page read so far on top of the copies (on a GPU load, the
    # whole checkpoint in host memory); copies also leave the model independent of the file.
    numel = {name: math.prod(expected[name].shape) for _, _, name in plan}
    bar = Progress(sum(numel.values()) * torch.empty((), dtype=dtype).element_size(), "loading weights", bytes_=True)
    try:
        for path, key, name in plan:
            with open_weights(path) as f:
                try:
                    t = f.get_tensor(key).to(device=device, dtype=dtype, copy=True)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise UserError(f"{path}: tensor {key} cannot be read ({e}); the file is truncated or "
                                    "corrupt") from None
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(t, requires_grad=False))
            bar.update(numel[name] * t.element_size())
    finally:
        bar.close()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def resolve_device(name: str, auto: bool = True) -> torch.device:
    """A --device value -> torch device: cpu, cuda or cuda:N (refused, with what to do, on a machine
    without CUDA), and, where `auto`, "auto" (CUDA when present)."""
    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but this machine has no CUDA device (or torch is a CPU build); "
                            "use --device cpu")
        try:
            return torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device name; use cuda or cuda:N") from None
    raise UserError(f"unknown --device {name!r}; use {'auto, ' if auto else ''}cpu or cuda")


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A --dtype value -> torch dtype. "auto": float16 on CUDA, float32 on the CPU (where float16 matmuls
    are slow and bfloat16 needs AMX or AVX512-BF16 to pay)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------
# DyRate's predictor file (predictor.py holds the predictor itself): safetensors with the layer weights
# and a metadata header:
#   format        "dyrate_ref-predictor-2"
#   layer         K, the pruning layer whose input attention (layer K-1) the features read
#   cuts          JSON list of the cut each output stands for
#   features      JSON list of feature names, in input order
#   hidden        0 for linear, else the MLP's hidden width
#   confidence    the default decoding confidence
#   score         the attention score its features read: last, mean or accumulated (pruning.SCORES);
#                 absent in files written before the score was a setting, which read "last"
#   model         fingerprint of the config.json it was trained on (the file is refused for other models)
#   trained_on    the weights directory's name; training settings (margin, rounds, seed, examples, ...)

PREDICTOR_FORMAT = "dyrate_ref-predictor-2"
SHIPPED_PREDICTOR = "dyrate_predictor.safetensors"  # beside the weights: the one DyRate uses by default


def model_fingerprint(cfg) -> str:
    """Which model a predictor belongs to: a hash of the architecture (not of the weights, which would
    mean reading them all)."""
    return hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]


def shipped_predictor_path(weights_dir: str) -> str | None:
    p = os.path.join(weights_dir, SHIPPED_PREDICTOR)
    return p if os.path.isfile(p) else None


def load_predictor(path: str, cfg, weights_dir: str = "") -> RatePredictor:
    """Read a predictor file and check that it fits this model; every problem is a UserError."""
    check_input_file(path, "predictor file", "a predictor file (.safetensors) that train_predictor wrote")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"predictor file {path} is not a readable safetensors file ({e}); retrain or re-copy it") from None
    if meta.get("format") != PREDICTOR_FORMAT:
        raise UserError(f"{path} is not a dyrate_ref predictor of this version (format {meta.get('format')!r}); "
                        "retrain it with python -m dyrate_ref.tools.train_predictor")
    try:
        layer, hidden, confidence = int(meta["layer"]), int(meta["hidden"]), float(meta["confidence"])
        cuts, names = json.loads(meta["cuts"]), json.loads(meta["features"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"predictor {path} has a damaged header ({e}); retrain it") from None
    if tuple(names) != FEATURES:
        raise UserError(f"predictor {path} was trained on other features ({len(names)}); retrain it with this version")
    if meta.get("model") != model_fingerprint(cfg):
        raise UserError(f"predictor {path} was trained for another model ({meta.get('trained_on', '?')}), not "
                        f"{weights_dir or 'these weights'}; train one with python -m dyrate_ref.tools.train_predictor")
    score = meta.get("score", "last")
    if score not in ("last", "mean", "accumulated"):
        raise UserError(f"predictor {path} has a damaged header (score {score!r}); retrain it")
    pred = RatePredictor(layer, cuts, hidden, confidence, {k: v for k, v in meta.items()}, score)
    try:
        pred.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"predictor {path} does not match its own header ({str(e).splitlines()[0]}); retrain it") from None
    pred.path = os.path.abspath(path)
    return pred.eval()
