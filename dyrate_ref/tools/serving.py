"""What pruning buys a server, at shapes that cannot run here (LLaVA-1.5-7B on a GPU): an analytic model
of the bytes a decode step reads and the largest batch that fits, from the kept fraction per step.
report.serving_table prints it for the evaluation's rows; cost.py counts what a run here did."""

from __future__ import annotations

import math

from ..model import TextConfig


def serving_kv_bytes(tc: TextConfig, K: int, N: int, P: int, t: int, kept: float, element_size: int = 2) -> float:
    """An analytic model, for serving arithmetic at shapes we cannot run here: the KV bytes one sequence
    holds at answer step t when a fraction `kept` of its N visual tokens is left in layers >= K (layers
    < K keep all P prompt tokens). P counts the prompt with its N visual tokens."""
    L = tc.num_hidden_layers
    slots = K * (P + t) + (L - K) * (P - N * (1 - kept) + t)
    return 2 * slots * tc.num_key_value_heads * tc.head_dim * element_size


def serving(tc: TextConfig, K: int, N: int, P: int, T: int, kept: float, weight_bytes: float, gpu_bytes: float,
            batch: int, element_size: int = 2) -> dict:
    """What pruning buys a server (analytic, batch of identical requests, answer of T tokens): bytes read
    per decode step (every weight once, every sequence's KV cache once, at the answer's middle step) and
    the largest batch whose KV caches, at the answer's last step, fit beside the weights."""
    mid = serving_kv_bytes(tc, K, N, P, T // 2, kept, element_size)
    last = serving_kv_bytes(tc, K, N, P, T, kept, element_size)
    return {"bytes_per_step": weight_bytes + batch * mid, "kv_share": batch * mid / (weight_bytes + batch * mid),
            "max_batch": int((gpu_bytes - weight_bytes) // last)}


def depth_matched_layer(K: int, L_from: int, L_to: int) -> int:
    """The layer that cuts the same share of another decoder's depth: K / L_from of L_to layers, rounded
    (K = 1 of the demo's 8 is 4 of LLaVA-1.5-7B's 32; K = 7 is 28). At least 1, at most L_to - 1."""
    return min(L_to - 1, max(1, math.floor(K * L_to / L_from + 0.5)))


def serving_schedule(tc: TextConfig, K: int, N: int, P: int, kept: list[float], T: int, weight_bytes: float,
                     gpu_bytes: float, batch: int, element_size: int = 2) -> dict:
    """The serving arithmetic of a rate that changes over the answer (analytic, a batch of identical
    requests): kept[t] is the kept fraction of the N visual tokens at answer step t (the last value repeats
    past the list's end). A decode step reads every weight once and every sequence's whole cache once:
    bytes per step are averaged over the T steps of the answer. The largest batch is set by the cache's
    peak over the answer (not its mean): every sequence must fit at its largest."""
    per_step = [serving_kv_bytes(tc, K, N, P, t, kept[min(t, len(kept) - 1)], element_size) for t in range(T)]
    mean, peak = sum(per_step) / T, max(per_step)
    return {"bytes_per_step": weight_bytes + batch * mean, "kv_share": batch * mean / (weight_bytes + batch * mean),
            "max_batch": int((gpu_bytes - weight_bytes) // peak), "kv_mean": mean, "kv_peak": peak}
