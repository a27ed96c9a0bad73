"""Tiny random llava-hf checkpoints built offline with transformers, in each weight-key layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from dyrate_ref.demo.bpe import save_tokenizer_files, train_bpe

CORPUS = [
    "USER: What color is the triangle? ASSISTANT: The triangle is red.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes.",
    "USER: Describe the image. ASSISTANT: A blue circle at the top left and a green square.",
    "Is there a yellow star? Yes. No. café über naïve 東京 ümlaut",
] * 5

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = train_bpe(CORPUS, vocab_size=320)
    return _TOKENIZER


def randomize(model: torch.nn.Module, seed: int = 0):
    """Replace HF's tiny-std init with weights large enough that a wrong formula changes the output
    visibly: fan-in scaled matrices, norm weights around 1, biases around 0 but not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def hf_config(vision=None, text=None, **top):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    tok = tokenizer()
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8, projection_dim=16, hidden_act="quick_gelu")
    v.update(vision or {})
    t = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=tok.get_vocab_size() + 6, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             rms_norm_eps=1e-6)
    t.update(text or {})
    theta = t.pop("rope_theta", 10000.0)
    lc = LlamaConfig(**t)
    lc.rope_parameters = {"rope_theta": theta, "rope_type": "default"}
    top.setdefault("image_token_index", tok.token_to_id("<image>"))
    return LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=lc, **top)


# (c) transformers 5.x save_pretrained names -> the other two layouts
TO_LAYOUT = {
    "a": [("vision_tower.", "vision_tower.vision_model.")],
    "b": [("vision_tower.", "model.vision_tower.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."),
          ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")],
    "c": [],
}


def make_checkpoint(out_dir: str, cfg=None, layout: str = "c", shards: int = 1, rope_style: str = "5.x",
                    seed: int = 0, dtype=torch.float32):
    """Write a random LLaVA checkpoint directory; returns the HF model it was saved from."""
    from transformers import LlavaForConditionalGeneration
    cfg = cfg or hf_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.to(dtype).save_pretrained(out_dir)
    state = load_file(os.path.join(out_dir, "model.safetensors"))
    os.remove(os.path.join(out_dir, "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        for old, new in TO_LAYOUT[layout]:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    if layout == "a":  # public files also carry CLIP's position_ids buffer
        n = cfg.vision_config.image_size // cfg.vision_config.patch_size
        renamed["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n * n + 1)[None]
    keys = sorted(renamed)
    if shards == 1:
        save_file(renamed, os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: renamed[k].contiguous() for k in keys[i::shards]}
            save_file(part, os.path.join(out_dir, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if rope_style == "4.x":  # transformers 4.x wrote rope_theta at the top of text_config
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            raw = json.load(f)
        rope = raw["text_config"].pop("rope_parameters")
        raw["text_config"]["rope_theta"] = rope["rope_theta"]
        with open(path, "w") as f:
            json.dump(raw, f, indent=2)
    save_tokenizer_files(tokenizer(), out_dir, cfg.text_config.max_position_embeddings)
    size = cfg.vision_config.image_size
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                   "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}, f, indent=2)
    return model


def hf_processor(weights_dir: str, cfg):
    """transformers' LlavaProcessor on the PIL image path (no torchvision here)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor
    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(weights_dir),
                          tokenizer=AutoTokenizer.from_pretrained(weights_dir),
                          patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1)


def noise_image(width: int, height: int, seed: int = 0, sigma: float = 50.0):
    """A grey-noise RGB picture from its own seeded generator (Image.effect_noise draws from a
    process-global one, so what a test saw would depend on which tests ran before it)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    grey = (128 + sigma * torch.randn(height, width, generator=g)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(grey.numpy(), mode="L").convert("RGB")


# The demo's recipes cut to a few steps on a tiny model (test_demo, test_training_pipeline).
TINY = {"vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, projection_dim=32),
        "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)}


def tiny_recipe(recipe, steps=2):
    """The recipe with every stage cut to `steps` steps of 4 pictures (its mixtures unchanged) for TINY's
    2-layer decoder: a stage the recipe runs shallower runs on 1 layer."""
    import dataclasses
    return dataclasses.replace(recipe, warmup=2, vision_steps=2, stages=tuple(
        dataclasses.replace(s, steps=steps, scenes=4, layers=1 if s.layers else None) for s in recipe.stages))


def hub_cache(root, repo_id: str, src: str, revisions=("aaaa1111", "bbbb2222"), main="bbbb2222"):
    """The layout huggingface_hub writes: models--org--name/{blobs,refs,snapshots}; each snapshot file is a
    relative symlink into blobs/ (named by content), refs/main names the current revision."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for rev in revisions:
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for name in os.listdir(src):
            blob = repo / "blobs" / f"{rev}-{name}"
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            if name == "config.json" and rev != main:  # the other revision is recognisably different
                cfg = json.loads(data)
                cfg["text_config"]["num_hidden_layers"] = 3
                data = json.dumps(cfg).encode()
            blob.write_bytes(data)
            os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    (repo / "refs" / "main").write_text(main)
    return repo


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_run(*args, timeout=300):
    """python ARGS in the repository, as a user runs a command: -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def generate_run(w, img, *extra):
    """generate.py on checkpoint w and picture img with a fixed prompt and 8 new tokens, plus `extra`."""
    return python_run(os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "Describe it.", "--weights", w,
                      "--max-new-tokens", "8", *extra)
