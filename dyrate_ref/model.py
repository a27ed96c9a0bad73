"""LLaVA-1.5, the whole model, top to bottom.

    pixels --CLIP ViT--> patch features --projector--> visual tokens
    prompt ids --embed--> text tokens; visual tokens replace the <image> placeholders
    tokens --Llama decoder (explicit attention, explicit KV cache)--> logits

Module and parameter names follow Hugging Face's llava-hf checkpoints, so weights load by name
(see loading.py for the key-rename table). Shape letters, the same in every file of the package:
  B batch              T tokens fed in one forward (query rows); in a trace, the generated tokens
  P prompt tokens      S key/value slots (cache length)      N visual tokens     M kept visual tokens
  E evicted tokens     H heads     Hkv key/value heads       G = H / Hkv         D head dim
  C channels (hidden size)         V vocab    L layers    K the pruning layer (1 <= K <= L-1)
  F predictor features             U the predictor's cuts

The decoder is deliberately run layer by layer from the outside: the generation loop in generation.py
runs layers [0, K), reads layer K-1's attention probabilities, decides which visual tokens to keep,
evicts the rest from the cache, and runs layers [K, L). Nothing in here knows about pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Configs. Field names and defaults are Hugging Face's (CLIPVisionConfig, LlamaConfig, LlavaConfig), so
# a config.json that leaves a field out means what it means to transformers (loading.config_from_dict
# reads one).


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (HF's rule)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # files spell it at the top level (4.x) or in rope_parameters (5.x)
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        # Frozen dataclass: fill the derived defaults once, here, so the config is never mutated later.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)


# LLaVA-1.5's tower (CLIP ViT-L/14-336) is what transformers assumes when a llava config.json has no
# vision_config at all (LlavaConfig.sub_configs_defaults); a vision_config that is present starts from
# CLIPVisionConfig's own defaults instead.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)


@dataclass(frozen=True)
class LlavaConfig:
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(**LLAVA_DEFAULT_VISION))
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    # HF writes one int or a list; held here always as a tuple (one entry for LLaVA-1.5's -2)
    vision_feature_layer: tuple[int, ...] = (-2,)
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    multimodal_projector_bias: bool = True

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """vision_feature_layer as indices into the tower's hidden states (0 = embeddings); negative ones
        count from the end, like HF's hidden_states[i]."""
        L = self.vision_config.num_hidden_layers
        return tuple(i if i >= 0 else L + 1 + i for i in self.vision_feature_layer)

    @property
    def num_image_tokens(self) -> int:
        """How many visual tokens one image becomes: one per patch, +1 (CLS) with strategy 'full'."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision_config.num_patches + extra


# ----------------------------------------------------------------------------------------------------
# Small pieces.

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as transformers' "gelu"
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's original approximation
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as HF's LlamaRMSNorm does (matters in fp16).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [..., D/2] each
    return torch.cat([-x2, x1], dim=-1)  # [..., D]


# ----------------------------------------------------------------------------------------------------
# CLIP ViT vision tower (HF: CLIPVisionModel; llava-hf nests it as vision_tower.vision_model.*).


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = C // cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        scores = (q @ k.transpose(-2, -1)) * D**-0.5  # [B, H, T, T]; no mask: every patch sees every patch
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # [B, C, H/p, W/p]
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, C]  row-major over the patch grid
        cls = self.class_embedding.expand(B, 1, -1)  # [B, 1, C]
        x = torch.cat([cls, patches], dim=1)  # [B, 1+N, C]
        return x + self.position_embedding.weight[None]  # [B, 1+N, C]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = CLIPEncoder(cfg)
        # LLaVA reads hidden states before post_layernorm, so it is never applied; it is kept only so that
        # loading stays strict (every tensor of the checkpoint has a home).
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig, vision_width: int):
        super().__init__()
        C = cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, C, bias=cfg.multimodal_projector_bias)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(C, C, bias=cfg.multimodal_projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------
# The KV cache: per layer, keys and values of every token the layer can still attend to, plus the
# original position of each slot. Layers may hold different numbers of slots (pruning evicts visual
# tokens from layers >= K only), so each layer is its own pair of tensors.


class KVCache:
    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers  # layer -> [B, Hkv, S_l, D]
        self.v: list[torch.Tensor | None] = [None] * num_layers  # layer -> [B, Hkv, S_l, D]
        self.pos: list[torch.Tensor | None] = [None] * num_layers  # layer -> [S_l] original positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write T new slots into `layer` (HF's DynamicCache.update, gpt-fast's KVCache.update) and return
        everything it holds: k, v [B, Hkv, S_l, D], pos [S_l].

        torch.cat reallocates each step: simple and growable; a serving engine would preallocate.
        """
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer] = k, v, pos
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)  # [B, Hkv, S_l + T, D]
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)  # [B, Hkv, S_l + T, D]
            self.pos[layer] = torch.cat([self.pos[layer], pos])  # [S_l + T]
        return self.k[layer], self.v[layer], self.pos[layer]

    def length(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def evict(self, layers, positions: torch.Tensor):
        """In each of `layers`, drop for good the slots that hold the given original positions [E] (the
        tensors really shrink, so later steps read less). The layers must share one slot layout, as layers
        >= K do: the slots are found once, not per layer."""
        layout = self.pos[layers[0]]  # [S]
        slots = torch.isin(layout, positions, invert=True).nonzero().squeeze(1)  # [S_kept]
        for layer in layers:
            assert self.pos[layer].shape == layout.shape, "evict: layers with different slot layouts"
            self.k[layer] = self.k[layer].index_select(2, slots)  # [B, Hkv, S_kept, D]
            self.v[layer] = self.v[layer].index_select(2, slots)  # [B, Hkv, S_kept, D]
            self.pos[layer] = self.pos[layer].index_select(0, slots)  # [S_kept]


# ----------------------------------------------------------------------------------------------------
# Llama decoder.


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, pos, cache: KVCache | None, layer: int, mask=None, key_weight=None,
                want_probs=False):
        """x [B, T, C]; cos, sin [T, D]; pos [T] original positions of the T queries.

        By default a query sees every key whose original position is <= its own: causal, and correct
        whatever was evicted, because eviction removes keys rather than masking them.
        mask: optional bool [..., T, S] (True = may attend) over the keys this call sees (cache + new),
        replacing that default (the no-cache oracle states an eviction this way).
        key_weight: optional float [..., T, S] in [0, 1] per key, on top of the mask: the probabilities
        are multiplied by it and renormalised, i.e. log(weight) is added to the scores, with a finite
        gradient at weight 0 (a relaxed, differentiable eviction: tools/predictor_e2e.py).
        Returns out [B, T, C] and, if asked, the attention probabilities [B, H, T, S] in fp32.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        q = q * cos + rotate_half(q) * sin  # [B, H, T, D]
        k = k * cos + rotate_half(k) * sin  # [B, Hkv, T, D]
        if cache is not None:
            k, v, kv_pos = cache.update(layer, k, v, pos)  # [B, Hkv, S, D], [S]
        else:
            kv_pos = pos
        k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # [B, H, S, D] each

        scores = (q @ k.transpose(-2, -1)) * D**-0.5  # [B, H, T, S]
        if mask is None:
            mask = kv_pos[None, :] <= pos[:, None]  # [T, S]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1, dtype=torch.float32)  # [B, H, T, S], fp32 as in HF eager
        if key_weight is not None:
            probs = probs * key_weight
            probs = probs / probs.sum(-1, keepdim=True)
        out = probs.to(q.dtype) @ v  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H*D]
        return self.o_proj(out), (probs if want_probs else None)


def repeat_kv(x: torch.Tensor, G: int) -> torch.Tensor:
    """Grouped-query attention as Hugging Face writes it: each of the Hkv key/value heads serves G query
    heads, query head h reading kv head h // G. [B, Hkv, S, D] -> [B, H, S, D]. LLaVA-1.5 has G = 1."""
    if G == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, C, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, pos, cache, layer, mask=None, key_weight=None, want_probs=False):
        a, probs = self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, layer, mask, key_weight, want_probs)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), probs


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------
# The whole model.


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        vc, tc = cfg.vision_config, cfg.text_config
        self.vision_tower = CLIPVisionTower(vc)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg, vc.hidden_size * len(cfg.vision_feature_layer))
        self.model = LlamaModel(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if tc.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- pixels -> visual tokens ---------------------------------------------------------------------

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the projector reads: pixel_values [B, 3, image_size, image_size] -> the feature layers'
        tokens [B, N, C_vis * len(vision_feature_layer)]. states is HF's `hidden_states` tuple, computed
        only as far as needed: entry 0 the input to the first encoder layer, entry i layer i's output."""
        cfg, tower = self.config, self.vision_tower
        x = tower.pre_layrnorm(tower.embeddings(pixel_values.to(self.lm_head.weight.dtype)))  # [B, 1+N, C_vis]
        states = [x]
        for layer in tower.encoder.layers[:max(cfg.feature_layers)]:
            x = layer(x)
            states.append(x)
        picked = [states[i] for i in cfg.feature_layers]  # each [B, 1+N_patches, C_vis]
        if cfg.vision_feature_select_strategy == "default":
            picked = [s[:, 1:] for s in picked]  # drop CLS: [B, N_patches, C_vis]
        return torch.cat(picked, dim=-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, image_size, image_size] -> visual tokens [B, N, C_text]."""
        return self.multi_modal_projector(self.vision_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, T] -> embeddings [B, T, C] with the <image> placeholders replaced, in order, by
        the visual tokens [B, N, C] (B*N placeholders in all)."""
        x = self.model.embed_tokens(input_ids)  # [B, T, C]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        if image_features is None:
            assert not is_image.any(), "<image> tokens in the input but no image"
            return x
        assert int(is_image.sum()) == image_features.shape[0] * image_features.shape[1], \
            "number of <image> tokens differs from the number of visual tokens"
        x = x.clone()
        x[is_image] = image_features.reshape(-1, x.shape[-1]).to(x.dtype)  # row-major: image b, token n
        return x

    # --- the decoder, run layer by layer by its callers ------------------------------------------------

    def rope(self, pos: torch.Tensor):
        """cos, sin for rotate-half RoPE at original positions pos [T] -> [T, D] each, in the model's dtype;
        every decoder layer of one forward shares them. Computed in fp32 from the positions themselves,
        not sliced from a table, because after pruning the positions in the cache are not 0..S-1."""
        tc = self.config.text_config
        D = tc.head_dim
        inv_freq = 1.0 / (tc.rope_theta ** (torch.arange(0, D, 2, device=pos.device).float() / D))  # [D/2]
        angles = pos.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([angles, angles], dim=-1)  # [T, D]  (HF layout: the two halves repeat)
        dtype = self.lm_head.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [B, T, C] -> logits [B, T, V]."""
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids, pixel_values=None):
        """Plain full forward, no cache, no pruning: input_ids [B, T] -> logits [B, T, V] (what the
        parity tests compare with transformers)."""
        feats = self.image_features(pixel_values) if pixel_values is not None else None
        x = self.embed(input_ids, feats)  # [B, T, C]
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        cos, sin = self.rope(pos)  # [T, D] each
        for i, layer in enumerate(self.model.layers):
            x, _ = layer(x, cos, sin, pos, None, i)
        return self.logits(x)
