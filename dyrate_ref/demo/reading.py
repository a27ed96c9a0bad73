"""Does a model read the question? The kind-swap test.

On one picture, ask the same question about two different shape kinds that are both in it ("What
color is the circle?" / "What color is the star?"). A model that reads the question answers them
differently; one that answers "some shape of the scene" gives the same distribution whatever kind is
asked. The sensitivity is the mean KL between the first-answer-token distributions of the two
prompts, over colour and position questions on scenes with two or more kinds seen once. Used by the
training log (the go/no-go signal) and by the evaluation's report, so both print the same figure.
"""

from __future__ import annotations

import random

import torch

from .scenes import random_scene

SWAP_SEED = 10_000_033  # its own held-out stream: neither training (< 10_000_000) nor eval_set


def kind_swap_pairs(n_scenes: int, seed: int = SWAP_SEED):
    """[(scene, prompt_a, prompt_b)]: colour and position questions about two different kinds seen once
    in the same scene. Scenes with fewer than two such kinds are skipped (they are drawn until n_scenes
    have at least two). Answers restate the asked kind ("The circle is red."), so each prompt carries
    its own answer's start up to the answer word ("... ASSISTANT: The circle is"), as the model would have
    written it, so the distributions compared are those of the answer word."""
    rng = random.Random(seed)
    out = []
    while len({id(s) for s, _, _ in out}) < n_scenes:
        scene = random_scene(rng, 2, 5)
        kinds = [s.kind for s in scene.shapes]
        unique = sorted({k for k in kinds if kinds.count(k) == 1})
        if len(unique) < 2:
            continue
        a, b = rng.sample(unique, 2)
        where = {s.kind: ("in" if s.position == "center" else "at") for s in scene.shapes}
        out.append((scene, (f"What color is the {a}?", f"The {a} is"), (f"What color is the {b}?", f"The {b} is")))
        out.append((scene, (f"Where is the {a}?", f"The {a} is {where[a]} the"),
                    (f"Where is the {b}?", f"The {b} is {where[b]} the")))
    return out


def _ids(processor, prompt) -> torch.Tensor:
    """A prompt, or (prompt, the answer's start written for it) -> input ids [P]."""
    if isinstance(prompt, str):
        return processor.input_ids(prompt)
    question, start = prompt
    answer = processor.tokenizer.encode(" " + start, add_special_tokens=False).ids
    return torch.cat([processor.input_ids(question), torch.tensor(answer, dtype=torch.long)])


@torch.no_grad()
def first_token_logprobs(model, processor, images, prompts, device="cpu", batch: int = 32) -> torch.Tensor:
    """log-softmax of the first answer token for each (image, prompt): -> [n, V] float32."""
    out = []
    for i in range(0, len(prompts), batch):
        ids = [_ids(processor, p) for p in prompts[i:i + batch]]
        # No padding: callers group prompts of equal token count, so no mask is needed.
        assert len({len(x) for x in ids}) == 1, "first_token_logprobs: prompts of one call must be equally long"
        px = torch.cat([processor.pixel_values(img) for img in images[i:i + batch]]).to(device)
        logits = model(torch.stack(ids).to(device), px)[:, -1].float()  # [b, V]
        out.append(logits.log_softmax(-1).cpu())
    return torch.cat(out)


def _grouped_logprobs(model, processor, images, prompts, device):
    """first_token_logprobs over prompts of any lengths (grouped by token count, order kept)."""
    lengths = [len(_ids(processor, p)) for p in prompts]
    result = [None] * len(prompts)
    for L in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == L]
        lp = first_token_logprobs(model, processor, [images[i] for i in idx], [prompts[i] for i in idx], device)
        for j, i in enumerate(idx):
            result[i] = lp[j]
    return torch.stack(result)  # [n, V]


def kind_swap_kl(model, processor, pairs, device="cpu") -> float:
    """Mean over pairs of the symmetric KL (nats) between the first-answer-token distributions of the
    two prompts. 0 means the asked kind is ignored."""
    images = [s.draw() for s, _, _ in pairs]
    a = _grouped_logprobs(model, processor, images, [p for _, p, _ in pairs], device)
    b = _grouped_logprobs(model, processor, images, [q for _, _, q in pairs], device)
    kl_ab = (a.exp() * (a - b)).sum(-1)
    kl_ba = (b.exp() * (b - a)).sum(-1)
    return float((0.5 * (kl_ab + kl_ba)).mean())
