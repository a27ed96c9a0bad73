"""Items shared among forked worker processes, one thread each, and the records put back in item order
(tools/evaluate.py --workers). Fork shares the loaded model; nothing is pickled but the records."""

from __future__ import annotations

import multiprocessing
import queue

import torch


class _Counter:
    """A progress bar's update() for a worker process: counts into a shared integer."""

    def __init__(self, value):
        self.value = value

    def update(self, n=1):
        with self.value.get_lock():
            self.value.value += n


def run_forked(work, n_items: int, workers: int, bar, known: dict) -> dict[str, list]:
    """work(w, counter, known_w) -> {name: records of items w, w + workers, ...}, called in `workers`
    forked processes (known_w: `known`'s records of those items; counter: a progress bar's update()).
    -> `known` with every new name's records in item order."""
    ctx = multiprocessing.get_context("fork")
    count, results = ctx.Value("i", 0), ctx.Queue()

    def target(w):
        torch.set_num_threads(1)
        results.put((w, work(w, _Counter(count), {name: recs[w::workers] for name, recs in known.items()})))

    procs = [ctx.Process(target=target, args=(w,)) for w in range(workers)]
    for p in procs:
        p.start()
    shards, shown = {}, 0
    while len(shards) < workers:
        try:
            w, recs = results.get(timeout=1.0)
            shards[w] = recs
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("an evaluation worker failed; run with --workers 1 to see why")
        if bar:
            bar.update(count.value - shown)
        shown = count.value
    for p in procs:
        p.join()
    merged = dict(known)
    for name in shards[0]:
        if name not in known:
            merged[name] = [None] * n_items
            for w, recs in shards.items():
                merged[name][w::workers] = recs[name]
    return merged
