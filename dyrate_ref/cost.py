"""Counted cost of a forward step: matmul FLOPs and KV-cache bytes, derived from what the step did.

The decode loop records only the shape of each step (generation.StepShape: how many query rows and keys
layers below and above K saw); everything here is arithmetic on those shapes, so the loop itself stays
free of bookkeeping.

FLOPs are counted the way torch.utils.flop_counter.FlopCounterMode (and FastV's paper) count them:
2·m·n·k for every matrix product and convolution, nothing for norms, softmax or element-wise ops.
The attention products are counted at their full T×S size because model.py computes them in full
(the causal mask is applied to the scores, not skipped). tests/test_pruning.py checks these formulas
against FlopCounterMode on real runs.
"""

from __future__ import annotations

from .model import LlavaConfig, TextConfig


def decoder_layer_flops(tc: TextConfig, T: int, S: int) -> int:
    """One Llama layer for T queries over S keys."""
    C, H, Hkv, D, I = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.intermediate_size
    projections = 2 * T * C * (2 * H * D + 2 * Hkv * D)  # q, o and k, v
    attention = 2 * (2 * H * T * S * D)  # q·kᵀ and probs·v
    mlp = 3 * 2 * T * C * I  # gate, up, down
    return projections + attention + mlp


def lm_head_flops(tc: TextConfig, rows: int = 1) -> int:
    return 2 * rows * tc.hidden_size * tc.vocab_size


def vision_flops(cfg: LlavaConfig) -> int:
    """Vision tower (only the layers LLaVA reads) plus the projector, for one image."""
    vc, tc = cfg.vision_config, cfg.text_config
    P, C, I = vc.num_patches, vc.hidden_size, vc.intermediate_size
    T = P + 1  # patches + CLS
    depth = max(cfg.feature_layers)
    patch_conv = 2 * P * C * vc.num_channels * vc.patch_size ** 2
    per_layer = 2 * T * C * C * 4 + 2 * (2 * T * T * C) + 2 * (2 * T * C * I)
    N = cfg.num_image_tokens
    projector = 2 * N * (C * len(cfg.feature_layers)) * tc.hidden_size + 2 * N * tc.hidden_size * tc.hidden_size
    return patch_conv + depth * per_layer + projector


def step_flops(tc: TextConfig, K: int, step) -> int:
    """Decoder + LM head FLOPs of one step (a generation.StepShape): rows_low queries over keys_low keys in
    each of the K layers below the pruning layer, rows_high over keys_high in the L - K layers above,
    and the LM head on the one row whose logits are read."""
    L = tc.num_hidden_layers
    low = K * decoder_layer_flops(tc, step.rows_low, step.keys_low)
    high = (L - K) * decoder_layer_flops(tc, step.rows_high, step.keys_high) if K < L else 0
    return low + high + lm_head_flops(tc, 1)


def kv_bytes(tc: TextConfig, K: int, step, element_size: int) -> int:
    """Bytes the KV cache holds after the step (batch 1): keys and values of every layer, keys_low slots
    in layers < K and keys_high in layers >= K."""
    L = tc.num_hidden_layers
    slots = K * step.keys_low + (L - K) * step.keys_high
    return 2 * slots * tc.num_key_value_heads * tc.head_dim * element_size


def flops_per_step(record) -> list[int]:
    """Matmul FLOPs of each step of a generation.Record; step 0 includes the vision tower and projector."""
    out = [step_flops(record.config.text_config, s.K, s) for s in record.shapes]
    if out:
        out[0] += vision_flops(record.config)
    return out


def kv_bytes_per_step(record) -> list[int]:
    """Bytes the KV cache holds after each step of a generation.Record."""
    return [kv_bytes(record.config.text_config, s.K, s, record.element_size) for s in record.shapes]
