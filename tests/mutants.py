"""The mutation check: does the suite catch deliberate, meaningful bugs?

    python tests/mutants.py [--only NAME ...] [--jobs N] [--list]

Each mutant below is one small edit of the project's source that a real bug could make. For each, the
project is copied to a temporary folder (the weights linked, not copied), the edit is applied (it must
match exactly once), and the test files that cover that part are run with `pytest -x`. A mutant is
caught when a test fails; the report names the first failing test. Exit status 0 when every mutant is
caught, 1 otherwise.

Every mutant names the function it edits (`where`: "name", "Class.name" or a module-level constant):
its edits are looked for inside that definition only, with any run of white space matching any other,
and the definition is found in `path` or, if it has moved, in whichever package file defines it. A
mutant so survives the code around it being moved or reformatted.

The test files run per mutant are the ones covering that part of the code (all files would take ~5 min
per mutant); `--full` runs the whole suite for each instead.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str  # the bug it stands for
    path: str
    edits: tuple[tuple[str, str], ...]  # (old, new), each old must occur exactly once
    tests: tuple[str, ...]
    where: str  # the function ("name" or "Class.name") or constant the edits lie in, wherever it now is


MODEL_TESTS = ("tests/test_trace.py", "tests/test_parity.py")
PRUNE_TESTS = ("tests/test_pruning.py",)
CLI_TESTS = ("tests/test_trace.py", "tests/test_cli.py")
SERVING_TESTS = ("tests/test_serving.py",)
REPORT_TESTS = ("tests/test_report.py",)
SCORE_TESTS = ("tests/test_scores.py",)
LOCATION_TESTS = ("tests/test_attention_location.py",)
PIPELINE_TESTS = ("tests/test_training_pipeline.py",)
PATH_TESTS = ("tests/test_commands.py",)
FIGURE_TESTS = ("tests/test_figures.py",)

MUTANTS = [
    # The model
    Mutant("rope-interleaved", "RoPE with GPT-J's interleaved pairs instead of HF's rotate-half halves",
           "dyrate_ref/model.py", (("emb = torch.cat([angles, angles], dim=-1)", "emb = angles.repeat_interleave(2, dim=-1)"),),
           MODEL_TESTS, where="LlavaForConditionalGeneration.rope"),
    Mutant("attention-scale", "attention scores scaled by 1/sqrt(D+1)", "dyrate_ref/model.py",
           (("scores = (q @ k.transpose(-2, -1)) * D**-0.5", "scores = (q @ k.transpose(-2, -1)) * (D + 1)**-0.5"),),
           MODEL_TESTS, where="LlamaAttention.forward"),
    Mutant("gqa-grouping", "query head h reads kv head h % Hkv instead of h // G", "dyrate_ref/model.py",
           (("x[:, :, None].expand(B, Hkv, G, S, D)", "x[:, None].expand(B, G, Hkv, S, D)"),),
           MODEL_TESTS, where="repeat_kv"),
    Mutant("feature-layer", "vision_feature_layer -2 read as the layer before it", "dyrate_ref/model.py",
           (("i if i >= 0 else L + 1 + i", "i if i >= 0 else L + i"),), MODEL_TESTS, where="LlavaConfig.feature_layers"),
    Mutant("cls-strategy", "strategy 'default' drops the last patch instead of CLS", "dyrate_ref/model.py",
           (("picked = [s[:, 1:] for s in picked]", "picked = [s[:, :-1] for s in picked]"),), MODEL_TESTS, where="LlavaForConditionalGeneration.vision_features"),
    # Loading
    Mutant("rename-public-layout", "the public hub layout's vision tower prefix not renamed", "dyrate_ref/loading.py",
           (('("vision_tower.vision_model.", "vision_tower."),', '("vision_tower.vision_model.", "vision_tower.vision_model."),'),),
           ("tests/test_loading.py",), where="KEY_RENAMES"),
    Mutant("no-cast", "--dtype ignored while loading", "dyrate_ref/loading.py",
           ((".to(device=device, dtype=dtype, copy=True)", ".to(device=device, copy=True)"),), ("tests/test_loading.py",), where="load_model"),
    # Processing
    Mutant("resample-bilinear", "images resized bilinearly instead of with the checkpoint's resample",
           "dyrate_ref/processing.py", (("img.resize((w, h), resample=s.resample)", "img.resize((w, h), resample=Image.Resampling.BILINEAR)"),),
           ("tests/test_processing.py",), where="pixel_values"),
    Mutant("crop-left", "center crop taken from the left edge", "dyrate_ref/processing.py",
           (("top, left = (H - ch) // 2, (W - cw) // 2", "top, left = (H - ch) // 2, 0"),), ("tests/test_processing.py",), where="center_crop"),
    Mutant("normalise-order", "mean subtracted after dividing by std", "dyrate_ref/processing.py",
           (("x = (x - mean) / std", "x = x / std - mean"),), ("tests/test_processing.py",), where="pixel_values"),
    # Pruning
    Mutant("span-offset", "dropped positions off by one (the image offset bug FastV's public code had)",
           "dyrate_ref/generation.py", (("gone = start + state.kept[", "gone = start + 1 + state.kept["),),
           PRUNE_TESTS, where="step"),
    Mutant("keep-instead-of-evict", "the kept tokens evicted instead of the dropped ones", "dyrate_ref/generation.py",
           (("gone = start + state.kept[~torch.isin(state.kept, kept)]", "gone = start + kept"),),
           PRUNE_TESTS, where="step"),
    Mutant("not-nested", "DyRate's schedule re-chooses from all N tokens, not from kept_{t-1}", "dyrate_ref/pruning.py",
           (("return top_k_sorted(kept, scores, min(kept.numel(), kept_count(scores.numel(), rate)))",
             "return top_k_sorted(torch.arange(scores.numel(), device=scores.device), scores, "
             "min(kept.numel(), kept_count(scores.numel(), rate)))"),),
           PRUNE_TESTS, where="DyRateSchedule.choose"),
    Mutant("kept-count-rounding", "how many to keep: the dropped count truncated instead of rounded half up",
           "dyrate_ref/pruning.py", (("return n - math.floor(round(rate * n, 6) + 0.5)", "return n - math.floor(round(rate * n, 6))"),),
           PRUNE_TESTS + ("tests/test_trace.py",), where="kept_count"),
    # Cost
    Mutant("flops-vision-attention", "the vision tower's attention products left out of the count", "dyrate_ref/cost.py",
           (("+ 2 * (2 * T * T * C) +", "+ 0 * (2 * T * T * C) +"),), PRUNE_TESTS, where="vision_flops"),
    Mutant("flops-mlp", "the MLP counted as two matmuls", "dyrate_ref/cost.py",
           (("mlp = 3 * 2 * T * C * I", "mlp = 2 * 2 * T * C * I"),), PRUNE_TESTS, where="decoder_layer_flops"),
    Mutant("flops-lm-head", "the LM head left out", "dyrate_ref/cost.py",
           (("return low + high + lm_head_flops(tc, 1)", "return low + high"),), PRUNE_TESTS, where="step_flops"),
    Mutant("flops-ignore-eviction", "decode FLOPs above K counted over every key, as if nothing were evicted",
           "dyrate_ref/cost.py", (("decoder_layer_flops(tc, step.rows_high, step.keys_high)",
                                   "decoder_layer_flops(tc, step.rows_high, step.keys_low)"),), PRUNE_TESTS, where="step_flops"),
    Mutant("kv-bytes-keys-only", "KV bytes count keys only", "dyrate_ref/cost.py",
           (("    return 2 * slots * tc.num_key_value_heads * tc.head_dim * element_size",
             "    return slots * tc.num_key_value_heads * tc.head_dim * element_size"),),
           ("tests/test_trace.py",) + PRUNE_TESTS, where="kv_bytes"),
    # The trace
    Mutant("trace-rows-shifted", "trace logits rows shifted by one step", "dyrate_ref/trace.py",
           (('"logits": torch.stack(record.logits)', '"logits": torch.stack(record.logits[1:] + record.logits[:1])'),),
           CLI_TESTS, where="trace_tensors"),
    Mutant("trace-metadata", "the trace records the layer given, not the one resolved", "dyrate_ref/settings.py",
           (("meta[f.name] = setting_text(getattr(method, f.name))",
             "meta[f.name] = setting_text(getattr(method, f.name) if f.name != 'layer' "
             "or origins is None or origins['layer'].kind == 'flag' else None)"),), CLI_TESTS, where="metadata"),
    # The CLI
    Mutant("no-streaming", "the answer printed at the end instead of streamed", "dyrate_ref/cli.py",
           (("        sys.stdout.write(decoder.push(tid))\n        sys.stdout.flush()\n",
             "        held.append(decoder.push(tid))\n"),
            ("    t0 = time.time()\n", "    held = []\n    t0 = time.time()\n"),
            ('    sys.stdout.write("\\n")\n', '    sys.stdout.write("".join(held) + "\\n")\n')),
           CLI_TESTS, where="run"),
    Mutant("not-atomic", "files written straight to their destination", "dyrate_ref/files.py",
           (("        write(tmp)\n        usual_mode(tmp, 0o666)", "        tmp = path\n        write(tmp)\n        usual_mode(tmp, 0o666)"),), CLI_TESTS, where="write_atomic"),
    Mutant("top-p-ignored", "--top-p accepted and ignored", "dyrate_ref/cli.py",
           (("Sampling(args.temperature, top_p, args.seed)", "Sampling(args.temperature, 1.0, args.seed)"),), CLI_TESTS, where="run"),
    Mutant("seed-ignored", "--seed accepted and ignored", "dyrate_ref/cli.py",
           (("Sampling(args.temperature, top_p, args.seed)", "Sampling(args.temperature, top_p, None)"),), CLI_TESTS, where="run"),
    # Round 2 (the newcomer issue's tests, and what an oracle's users rely on)
    Mutant("kl-reversed", "trace compare reports KL(backend || oracle), not KL(oracle || backend)", "dyrate_ref/tools/trace.py",
           (('kl = kl_divergence(ra["logits"], rb["logits"], torch.float64)', 'kl = kl_divergence(rb["logits"], ra["logits"], torch.float64)'),),
           ("tests/test_backend.py",), where="compare"),
    Mutant("prefix-is-same", "a backend that stopped early (its tokens a prefix) passes", "dyrate_ref/tools/trace.py",
           (("tokens_ok = first is None and ta.numel() == tb.numel()", "tokens_ok = first is None"),), ("tests/test_backend.py",), where="compare"),
    Mutant("iou-over-oracle", "kept-set IoU divides by the oracle's kept count, not the union", "dyrate_ref/tools/trace.py",
           (("inter / union.clamp(min=1)", "inter / ka.sum(1).float().clamp(min=1)"),), ("tests/test_backend.py",), where="compare"),
    Mutant("rmsnorm-order", "RMSNorm multiplies by its weight before casting back (not HF's order)", "dyrate_ref/model.py",
           (("return self.weight * x.to(dtype)", "return (self.weight * x).to(dtype)"),), ("tests/test_parity.py",), where="RMSNorm.forward"),
    Mutant("no-resize-ignored", "do_resize: false resizes anyway", "dyrate_ref/processing.py",
           (("    if s.do_resize:\n", "    if True:\n"),), ("tests/test_processing.py",), where="pixel_values"),
    Mutant("predictor-score-not-stored", "train_predictor labels by --score but the file says last",
           "dyrate_ref/tools/train_predictor.py", (("rollout, args.max_new_tokens, score=args.score)", "rollout, args.max_new_tokens)"),),
           ("tests/test_predictor.py",), where="run"),
    Mutant("mean-score-template-rows", "the mean score averages every row after the image, the template's too",
           "dyrate_ref/generation.py", (("rows[state.text[0]:state.text[1]] if t == 0", "rows[sum(state.span):] if t == 0"),),
           SCORE_TESTS, where="step"),
    Mutant("text-rows-from-image", "the question's rows start right after the image (the template's newline in)",
           "dyrate_ref/processing.py", (("first, end = max(front, after_image), len(ids) - back",
                                         "first, end = after_image, len(ids) - back"),), SCORE_TESTS, where="Processor.text_rows"),
    Mutant("accumulated-count", "the accumulated mean divides by one query too many", "dyrate_ref/tools/predictor_e2e.py",
           (("(end - first + torch.arange(T, device=rows.device)[:, None])",
             "(end - first + 1 + torch.arange(T, device=rows.device)[:, None])"),), SCORE_TESTS, where="step_scores"),
    Mutant("mean-score-every-step", "the mean score stays the running mean after the prefill", "dyrate_ref/pruning.py",
           (('(score == "mean" and t == 0)', '(score == "mean")'),), SCORE_TESTS, where="scored"),
    Mutant("choice-per-family", "each FastV K and score chosen apart, not FastV's one best", "dyrate_ref/tools/report.py",
           (('return "FastV" if family_name.startswith("FastV") else family_name', "return family_name"),),
           REPORT_TESTS, where="method_kind"),
    Mutant("random-beaten-at-1se", "better than random taken beyond one SE, not two", "dyrate_ref/tools/report.py",
           (('"better": bool(d > 2 * se)', '"better": bool(d > se)'),), REPORT_TESTS, where="better_than"),
    Mutant("step0-cut-counts-all", "an item counted as cut at step 0 when it kept every token", "dyrate_ref/tools/report.py",
           (("sum(x[0] < N for x in v)", "sum(x[0] <= N for x in v)"),), REPORT_TESTS, where="step0_table"),
    Mutant("location-area-any-pixel-asked", "the asked shape found by kind alone, the colour ignored", "dyrate_ref/demo/world.py",
           (("s.kind == kind and colour in (None, s.color)", "s.kind == kind"),), LOCATION_TESTS,
           where="SceneWorld.patch_regions"),
    Mutant("quantile-end", "the predictor's f-quantile read from the wrong end", "dyrate_ref/predictor.py",
           (("sorted_p[min(N - 1, int(round((1 - f) * N, 6)))]", "sorted_p[min(N - 1, int(round(f * N, 6)))]"),),
           ("tests/test_predictor.py",), where="predictor_features"),
    Mutant("topk-share-floor", "the predictor's top-p% shares count floor(p·N) tokens", "dyrate_ref/predictor.py",
           (("cum[max(1, math.ceil(f * N)) - 1]", "cum[max(1, math.floor(f * N)) - 1]"),), ("tests/test_predictor.py",), where="predictor_features"),
    Mutant("serving-heads-for-kv-heads", "serving KV bytes count attention heads, not key/value heads", "dyrate_ref/tools/serving.py",
           (("    return 2 * slots * tc.num_key_value_heads * tc.head_dim * element_size",
             "    return 2 * slots * tc.num_attention_heads * tc.head_dim * element_size"),), SERVING_TESTS, where="serving_kv_bytes"),
    Mutant("template-newline", "the prompt template ends its question with a newline", "dyrate_ref/processing.py",
           (('PROMPT_TEMPLATE = "USER: <image>\\n{prompt} ASSISTANT:"', 'PROMPT_TEMPLATE = "USER: <image>\\n{prompt}\\nASSISTANT:"'),),
           ("tests/test_processing.py",), where="PROMPT_TEMPLATE"),
    Mutant("layer-mismatch-ignored", "--layer that differs from the predictor's is silently replaced", "dyrate_ref/settings.py",
           (('if values.setdefault("layer", pred.layer) != pred.layer:', 'values["layer"] = pred.layer\n        if False:'),),
           ("tests/test_settings.py", "tests/test_cli.py"), where="make_method"),
    Mutant("confidence-ignored", "DyRate --confidence accepted and ignored", "dyrate_ref/pruning.py",
           (("self.predictor.choose_cut(predictor_features(scores, kept, t), self.confidence)",
             "self.predictor.choose_cut(predictor_features(scores, kept, t))"),), ("tests/test_settings.py",),
           where="DyRate.choose"),
    Mutant("vtw-origin-lies", "a calibration that found no layer is reported as a missing file", "dyrate_ref/settings.py",
           (('return None, f"{VTW_CALIBRATION} found no layer within its eta"', 'return None, f"no {VTW_CALIBRATION}"'),),
           ("tests/test_cli.py",), where="vtw_calibrated_layer"),
    # The measuring tools (tests/test_report.py works each figure out by hand)
    Mutant("se-unclustered", "the paired SE treats the questions about one picture as independent",
           "dyrate_ref/tools/report.py", (("clusters = clusters or [str(i) for i in range(n)]",
                                           "clusters = [str(i) for i in range(n)]"),), REPORT_TESTS, where="paired"),
    Mutant("kind-mean-over-all", "a per-kind score averaged over every item, not that kind's",
           "dyrate_ref/tools/report.py",
           (("if key in r and (kind is None or items[i].kind == kind)]", "if key in r]"),), REPORT_TESTS, where="summarise"),
    Mutant("forced-with-own-answer", "every item's forced costs counted on none's answer to the first item",
           "dyrate_ref/tools/evaluate.py", (('force=none[i]["tokens"], text=text).record', "force=none[0][\"tokens\"], text=text).record"),),
           REPORT_TESTS, where="run_method"),
    Mutant("prefill-flops-with-vision", "the LM prefill FLOPs include the vision tower", "dyrate_ref/tools/evaluate.py",
           (('"prefill_flops": flops[0] - vis,', '"prefill_flops": flops[0],'),), REPORT_TESTS, where="run_method"),
    Mutant("forced-over-own-base", "the forced FLOPs ratio is over the method's own FLOPs, not none's",
           "dyrate_ref/tools/report.py", (('"lm_flops_forced": f_lm / lm_base', '"lm_flops_forced": f_lm / lm'),),
           REPORT_TESTS, where="costs"),
    Mutant("depth-truncated", "K mapped by depth is truncated, not rounded (3 of 7 -> 13 of 32, not 14)",
           "dyrate_ref/tools/serving.py", (("math.floor(K * L_to / L_from + 0.5)", "math.floor(K * L_to / L_from)"),),
           SERVING_TESTS, where="depth_matched_layer"),
    Mutant("kept-schedule-over-all", "a step's kept fraction averaged over every answer, also those that ended",
           "dyrate_ref/tools/report.py", (("/ N / sum(len(r[\"kept\"]) > t for r in records)", "/ N / len(records)"),),
           REPORT_TESTS, where="kept_schedule"),
    Mutant("batch-from-mean", "the largest batch set by the cache's mean, not its peak", "dyrate_ref/tools/serving.py",
           (('"max_batch": int((gpu_bytes - weight_bytes) // peak)', '"max_batch": int((gpu_bytes - weight_bytes) // mean)'),),
           SERVING_TESTS, where="serving_schedule"),
    Mutant("openai-topk-worst-first", "a server's top-k kept worst first", "dyrate_ref/tools/trace.py",
           (("best = sorted(top.items(), key=lambda kv: -kv[1])[:k]", "best = sorted(top.items(), key=lambda kv: kv[1])[:k]"),),
           REPORT_TESTS, where="openai_trace"),
    Mutant("openai-chosen-dropped", "the chosen token's own log-prob left out when it is outside the top-k",
           "dyrate_ref/tools/trace.py", (('tops[-1].setdefault(tokens[-1], _logprob(_field(entry, "logprob", where), where))',
                                    '_logprob(_field(entry, "logprob", where), where)'),), REPORT_TESTS, where="openai_trace"),
    Mutant("limit-before-eos", "an answer ending on its last allowed token reported as cut at the limit",
           "dyrate_ref/generation.py",
           (("        if force is None and tid in stop_ids:\n            reason = \"eos\"\n            break\n"
             "        if len(tokens) >= max_new_tokens:\n            reason = \"forced\" if force is not None else \"max_new_tokens\"\n"
             "            break\n",
             "        if len(tokens) >= max_new_tokens:\n            reason = \"forced\" if force is not None else \"max_new_tokens\"\n"
             "            break\n        if force is None and tid in stop_ids:\n            reason = \"eos\"\n            break\n"),),
           REPORT_TESTS, where="generate"),
    Mutant("dagger-last-round-only", "each DAgger round refits on its own steps alone", "dyrate_ref/tools/train_predictor.py",
           (("feats, labels = torch.cat([feats, f]), torch.cat([labels, y])", "feats, labels = f, y"),), REPORT_TESTS, where="train_imitation"),
    Mutant("vtw-mean-of-means", "VTW's KL averaged per example, then over examples", "dyrate_ref/tools/calibrate_vtw.py",
           (("totals[K] += float(kl_divergence(logits_w, logits_full).sum())",
             "totals[K] += float(kl_divergence(logits_w, logits_full).mean())"),
            ("count += len(tokens)", "count += 1"),), REPORT_TESTS, where="mean_kl_per_layer"),
    Mutant("f1-repeat-counted", "object-F1 counts a shape named twice as two hits", "dyrate_ref/demo/scenes.py",
           (("        if t in remaining:\n            remaining.remove(t)\n", "        if t in gold:\n"),), REPORT_TESTS, where="object_f1"),
    Mutant("inside-by-prefix", "an output beside an input folder with a common prefix (w2/ beside w/) is refused",
           "dyrate_ref/files.py", (("return os.path.commonpath([real, top]) == top", "return real.startswith(top)"),),
           REPORT_TESTS, where="_inside"),
    Mutant("premise-kl-over-scored", "the premise summary's KL averaged over the scored items only",
           "dyrate_ref/tools/premise.py", (('"kl": sum(r["kl"] for r in rs) / n,',
                                            '"kl": sum(r["kl"] for r in scored) / max(1, len(scored)),'),), REPORT_TESTS, where="summarise_cuts"),
    Mutant("rate-nominal", "the trace records a fixed schedule's nominal rate, not the share dropped",
           "dyrate_ref/generation.py", (("rec.rates.append(1 - kept.numel() / N)",
                                         "rec.rates.append(getattr(method, 'schedule', None) and method.schedule[min(t, len(method.schedule) - 1)] "
                                         "or 1 - kept.numel() / N)"),), PRUNE_TESTS, where="step"),
    Mutant("output-over-input", "an output path that is one of the run's inputs is accepted", "dyrate_ref/files.py",
           (("if (os.path.isdir(source) and _inside(path, source)) or _same_file(path, source):", "if False:"),),
           ("tests/test_no_overwrite.py", "tests/test_bad_inputs.py"), where="check_outputs"),
    Mutant("forced-always-skipped", "every forced run skipped, own costs taken as the costs on none's answers",
           "dyrate_ref/tools/evaluate.py", (('same = gen.tokens == none[i]["tokens"]', "same = True"),),
           ("tests/test_evaluate_data.py",), where="run_method"),
    Mutant("rise-from-previous-step", "the first rise counted from the step before, not from the prefill, and from step 0",
           "dyrate_ref/tools/report.py", (("for t in range(1, len(kept)) if kept[t] < kept[0]", "for t in range(len(kept)) if kept[t] <= kept[0]"),),
           REPORT_TESTS, where="first_rise"),
    Mutant("comparison-ignores-accuracy", "the main comparison picks the cheapest row whatever its accuracy",
           "dyrate_ref/tools/report.py", (("ok = [r for r in rows if within(r, bounds)]", "ok = list(rows)"),), REPORT_TESTS, where="cheapest"),
    Mutant("comparison-any-layer", "the opponent's cheapest row taken at any K, not at DyRate's",
           "dyrate_ref/tools/report.py", (('if not same_k or c["layer"] == mine["layer"]', "if True"),), REPORT_TESTS, where="main_comparison"),
    Mutant("comparison-own-k-ignored", "a family that names its own K compared at DyRate's K all the same",
           "dyrate_ref/tools/report.py", (('("{K}" in pattern or "K=" not in pattern)', "True"),), REPORT_TESTS,
           where="main_comparison"),
    Mutant("comparison-not-beyond-2se", "a target met by any saving, however small against its standard error",
           "dyrate_ref/tools/report.py", (("ratio <= targets[cost] and d < -2 * se", "ratio <= targets[cost] and d < 0"),),
           REPORT_TESTS, where="main_comparison"),
    Mutant("schedule-from-none", "the fixed-schedule control follows none's counts, not its DyRate row's",
           "dyrate_ref/tools/evaluate.py", (("schedule=mean_schedule(records[r.schedule_of], N)",
                                             "schedule=mean_schedule(records[rows[0].name], N)"),), REPORT_TESTS,
           where="evaluate_all"),
    Mutant("schedule-from-one-answer", "the serving schedule keeps steps only one long answer reaches",
           "dyrate_ref/tools/report.py", (("need = min(min_answers, len(records))", "need = 1"),), REPORT_TESTS, where="kept_schedule"),
    Mutant("matched-accuracy-one-bound", "matched accuracy checks only its first bound (exact match), not F1 or the verdict",
           "dyrate_ref/tools/report.py", (("for k, bound in bounds.items() if", "for k, bound in list(bounds.items())[:1] if"),),
           REPORT_TESTS, where="within"),
    Mutant("rollout-confidence-ignored", "the DAgger rounds decode at the stored confidence, not --rollout-confidence",
           "dyrate_ref/tools/train_predictor.py", (("args.epochs, args.lr, args.seed, rollout, args.max_new_tokens,",
                                                    "args.epochs, args.lr, args.seed, args.confidence, args.max_new_tokens,"),),
           ("tests/test_predictor.py",), where="run"),
    Mutant("e2e-mask-not-cumulative", "the end-to-end route weighs step t's keys by step t's own mask, not by the "
           "product of every earlier step's (an evicted token would come back)",
           "dyrate_ref/tools/predictor_e2e.py", (("W = W * m  # [N]", "W = m  # [N]"),), ("tests/test_predictor_e2e.py",), where="relaxed_weights"),
    Mutant("e2e-grads-into-model", "the end-to-end route leaves the VLM's weights trainable",
           "dyrate_ref/tools/predictor_e2e.py", (("        p.requires_grad_(False)\n", "        p.requires_grad_(True)\n"),),
           ("tests/test_predictor_e2e.py",), where="freeze"),
    Mutant("blind-mask-ignored", "v5's blind look rows see the picture after all (the mask never reaches the layers)",
           "dyrate_ref/demo/batches.py", (("        mask = blind_masks(image_at, blind_from, T, P, dev)  # [R, 1, T, S]\n", ""),),
           ("tests/test_demo.py",), where="_group_ce"),
    Mutant("stage-schedule-global", "an appended stage follows the recipe's schedule, shifting v4's learning rates",
           "dyrate_ref/demo/recipes.py", (("return stage.lr * schedule(step, self.shared_steps, self.warmup, self.decay)",
                                           "return stage.lr * schedule(step, self.steps, self.warmup, self.decay)"),),
           ("tests/test_demo.py",), where="Recipe.lr"),
    # Round 4 (#43): tied to the function they edit (`where`), so that they survive its code moving
    Mutant("matched-bound-strict", "a loss of exactly the bound counted as beyond it", "dyrate_ref/tools/report.py",
           (("s[k + \"_delta\"] >= -bound - 1e-12", "s[k + \"_delta\"] > -bound"),), REPORT_TESTS, where="within"),
    Mutant("cheapest-kv-first", "the cheapest row chosen by KV first, LM FLOPs second", "dyrate_ref/tools/report.py",
           (('(r["lm_flops_forced"], r["kv_mean_forced"])', '(r["kv_mean_forced"], r["lm_flops_forced"])'),),
           REPORT_TESTS, where="cheapest"),
    Mutant("validation-picks-none", "the validation rule may choose none itself", "dyrate_ref/tools/report.py",
           (("cheapest(rows[1:], bounds)", "cheapest(rows, bounds)"),), REPORT_TESTS, where="validation_choice"),
    Mutant("comparison-ratio-ignored", "a target met beyond 2 SE whatever the cost ratio", "dyrate_ref/tools/report.py",
           (("ratio <= targets[cost] and d < -2 * se", "d < -2 * se"),), REPORT_TESTS, where="main_comparison"),
    Mutant("comparison-1.96-se", "beyond 1.96 SE taken for the declared 2 SE", "dyrate_ref/tools/report.py",
           (("d < -2 * se", "d < -1.96 * se"),), REPORT_TESTS, where="main_comparison"),
    Mutant("lr-stage-restarts", "each stage of a shared schedule restarts its warm-up", "dyrate_ref/demo/recipes.py",
           (("schedule(step, self.shared_steps, self.warmup, self.decay)",
             "schedule(within, self.shared_steps, self.warmup, self.decay)"),), PIPELINE_TESTS, where="Recipe.lr"),
    Mutant("decay-start-from-share", "the cosine starts after the decay share, not before the last of it",
           "dyrate_ref/demo/recipes.py", (("int(steps * (1 - decay))", "int(steps * decay)"),), PIPELINE_TESTS,
           where="schedule"),
    Mutant("train-lr-within", "the training loop sets each step's rate from the step within its stage",
           "dyrate_ref/demo/train.py", (('g["lr"] = recipe.lr(step)', 'g["lr"] = recipe.lr(within)'),), PIPELINE_TESTS,
           where="train"),
    Mutant("adam-state-dropped", "the decoder's growth restarts Adam's moments of the weights it had",
           "dyrate_ref/demo/train.py", (("opt.state[p] = previous.state[p]", "pass"),), PIPELINE_TESTS,
           where="optimizer"),
    Mutant("guard-asked-as-stage", "a guard picture is drawn as the guard stage but asked the stage's questions",
           "dyrate_ref/demo/batches.py", (("turns = self.turns(scene, drawn_as)", "turns = self.turns(scene, stage)"),),
           PIPELINE_TESTS, where="Batcher.batch"),
    Mutant("describe-every-picture", "every picture of a describing stage is described, not its share",
           "dyrate_ref/demo/batches.py", (("if stage.describe and self.rng.random() < stage.describe:",
                                           "if stage.describe:"),), PIPELINE_TESTS, where="Batcher.turns"),
    Mutant("blind-any-row", "the blind share applied to every row, not only the look-then-reason ones",
           "dyrate_ref/demo/batches.py", (('blind = kind == "look" and bool(self.recipe.blind) and',
                                           "blind = bool(self.recipe.blind) and"),), PIPELINE_TESTS, where="Batcher.batch"),
    Mutant("colour3-from-2-shapes", "the go/no-go's 'colour on 3-5 shapes' counts 2-shape scenes too",
           "dyrate_ref/demo/batches.py", (("len(item.scene.shapes) >= 3", "len(item.scene.shapes) >= 2"),),
           PIPELINE_TESTS, where="heldout_examples"),
    Mutant("heldout-scored-from-ignored", "a held-out check scores every answer token, not from its start",
           "dyrate_ref/demo/batches.py", (("labels[b, len(p) + first:len(p) + len(a)] = torch.tensor(a[first:])",
                                           "labels[b, len(p):len(p) + len(a)] = torch.tensor(a)"),), PIPELINE_TESTS,
           where="heldout_exact"),
    Mutant("look-blind-sighted", "the 'from the text alone' check sees the picture", "dyrate_ref/demo/batches.py",
           (('(scene, p, ans, "look_blind", b, b)', '(scene, p, ans, "look_blind", b, None)'),), PIPELINE_TESTS,
           where="heldout_examples"),
    Mutant("eval-look-from-main-stream", "the look-then-reason items drawn from the scenes' own stream, so the "
           "other items change with the option", "dyrate_ref/demo/scenes.py",
           (("look_item(scene, look_rng, look_form)", "look_item(scene, rng, look_form)"),), PIPELINE_TESTS,
           where="eval_set"),
    Mutant("item-seed-by-position", "a held-out item's random-baseline seed is its position in the set",
           "dyrate_ref/tools/data.py", (("for it in WORLD.held_out(n_scenes, split, look):",
                                         "for position, it in enumerate(WORLD.held_out(n_scenes, split, look)):"),
                                        ("it.scene.seed % 1_000_003", "position")), PIPELINE_TESTS, where="scene_items"),
    Mutant("relative-folder-as-hub-id", "only an absolute path is taken as a folder; a relative one that looks "
           "like owner/name is looked up in the hub cache", "dyrate_ref/loading.py",
           (("if os.path.exists(spec) or", "if os.path.isabs(spec) or"),), PATH_TESTS, where="resolve_weights"),
    Mutant("snapshots-by-name", "without refs/main the last snapshot by name is taken, not the newest",
           "dyrate_ref/loading.py", (("key=lambda r: os.path.getmtime(os.path.join(snapshots, r))", "key=str"),),
           PATH_TESTS, where="resolve_weights"),
    Mutant("results-weights-as-typed", "the results file names its weights as typed, so a resume from another "
           "folder is refused", "dyrate_ref/tools/evaluate.py",
           (('"weights": os.path.abspath(args.weights)', '"weights": args.weights'),), PATH_TESTS, where="run"),
    Mutant("trace-weights-as-typed", "the trace records --weights as typed (relative to a folder it does not name)",
           "dyrate_ref/cli.py", (("weights=os.path.abspath(weights)", "weights=weights"),), PATH_TESTS, where="run"),
    Mutant("progress-mb-rate-unscaled", "the byte rate printed in bytes per second under an MB/s label",
           "dyrate_ref/commands.py", (("self.done / self.scale / elapsed", "self.done / elapsed"),), PATH_TESTS,
           where="Progress.line"),
    Mutant("hours-total-minutes", "a duration over an hour shows the total minutes after the hours (1h100m)",
           "dyrate_ref/commands.py", (("{seconds % 3600 // 60:02d}m", "{seconds // 60:02d}m"),), PATH_TESTS,
           where="_duration"),
    Mutant("predictor-rollout-unresolved", "a predictor trained at the default rollout confidence records None",
           "dyrate_ref/tools/train_predictor.py", (("rollout_confidence=rollout)", "rollout_confidence=args.rollout_confidence)"),),
           PATH_TESTS, where="run"),
    Mutant("renamed-flag-accepted", "an old setting name (--rates) is taken as if it were a setting of its own",
           "dyrate_ref/settings.py", (("if name in RENAMED:", "if False:"),), ("tests/test_settings.py",),
           where="parse_settings"),
    # Round 5: the end-to-end trainer, the look stage's masks at their edges, figures at their call sites, and
    # this round's new code (the loop's contract, the recipe's gates, the training command's folder and time)
    Mutant("e2e-kl-reversed", "the e2e objective's KL taken from the pruned to the unpruned answer",
           "dyrate_ref/tools/predictor_e2e.py", (("kl = kl_divergence(full, logits).mean()", "kl = kl_divergence(logits, full).mean()"),),
           ("tests/test_predictor_e2e.py",), where="loss_of"),
    Mutant("e2e-kl-summed", "the e2e objective sums the KL over the answer instead of averaging it",
           "dyrate_ref/tools/predictor_e2e.py", (("kl = kl_divergence(full, logits).mean()", "kl = kl_divergence(full, logits).sum()"),),
           ("tests/test_predictor_e2e.py",), where="loss_of"),
    Mutant("e2e-kept-last-step", "the price on kept tokens reads the last step's weights only",
           "dyrate_ref/tools/predictor_e2e.py", (("kept = W.mean()", "kept = W[-1].mean()"),), ("tests/test_predictor_e2e.py",),
           where="loss_of"),
    Mutant("e2e-temperature-linear", "the Gumbel temperature annealed linearly, not geometrically",
           "dyrate_ref/tools/predictor_e2e.py", (("return start * (end / start) ** (epoch / max(1, epochs - 1))",
                                                 "return start + (end - start) * epoch / max(1, epochs - 1)"),),
           ("tests/test_predictor_e2e.py",), where="temperature"),
    Mutant("e2e-tau-fixed", "every epoch trained at the starting temperature", "dyrate_ref/tools/predictor_e2e.py",
           (("tau = temperature(epoch, epochs, tau_start, tau_end)", "tau = tau_start"),), ("tests/test_predictor_e2e.py",),
           where="train_e2e"),
    Mutant("e2e-last-epoch-kept", "the trainer returns the last epoch's predictor, not the best one",
           "dyrate_ref/tools/predictor_e2e.py", (("if after[0] < min(history):", "if True:"),), ("tests/test_predictor_e2e.py",),
           where="train_e2e"),
    Mutant("e2e-best-against-previous", "an epoch kept when it beats the epoch before it, not every earlier one",
           "dyrate_ref/tools/predictor_e2e.py", (("if after[0] < min(history):", "if after[0] < history[-1]:"),),
           ("tests/test_predictor_e2e.py",), where="train_e2e"),
    Mutant("blind-one-late", "the look row's first blind query still sees the picture", "dyrate_ref/demo/batches.py",
           (("blind_q = q_pos[None, :] >= start[:, None]", "blind_q = q_pos[None, :] > start[:, None]"),), PIPELINE_TESTS,
           where="blind_masks"),
    Mutant("blind-one-early", "the query just before the reasoning is already blind", "dyrate_ref/demo/batches.py",
           (("blind_q = q_pos[None, :] >= start[:, None]", "blind_q = q_pos[None, :] >= start[:, None] - 1"),),
           PIPELINE_TESTS, where="blind_masks"),
    Mutant("blind-hides-text", "a blind query loses the text keys too, not only the picture's", "dyrate_ref/demo/batches.py",
           (("hidden = blind_q[:, :, None] & image_at[None, None, :]",
             "hidden = blind_q[:, :, None] & torch.ones_like(image_at)[None, None, :]"),), PIPELINE_TESTS,
           where="blind_masks"),
    Mutant("serving-k-swapped", "the serving table maps K the wrong way round (7B's depth onto this one's)",
           "dyrate_ref/tools/report.py", (("K7 = depth_matched_layer(row.method.layer, L, L7)",
                                           "K7 = depth_matched_layer(row.method.layer, L7, L)"),), REPORT_TESTS,
           where="serving_table"),
    Mutant("label-path-as-written", "the shipped predictor named through another path gets a file name in its row",
           "dyrate_ref/tools/report.py", (("own = shipped is not None and os.path.realpath(m.predictor.path) == os.path.realpath(shipped)",
                                           "own = shipped is not None and m.predictor.path == shipped"),), REPORT_TESTS,
           where="label"),
    Mutant("contract-regrowth-unchecked", "a method that regrows dropped tokens runs on, its trace lying",
           "dyrate_ref/generation.py", (("torch.isin(after, before).all()  # strictly", "after.new_ones((), dtype=torch.bool)  # strictly"),),
           ("tests/test_generation.py",), where="check_kept"),
    Mutant("contract-repeats-allowed", "repeated kept indices pass the ascending check", "dyrate_ref/generation.py",
           (("ascending, subset = (after[1:] > after[:-1]).all()", "ascending, subset = (after[1:] >= after[:-1]).all()"),),
           ("tests/test_generation.py",), where="check_kept"),
    Mutant("contract-by-size", "a kept set of the same size is taken as the same set, unchecked", "dyrate_ref/generation.py",
           (("if after is before:", "if after.numel() == before.numel():"),), ("tests/test_generation.py",),
           where="check_kept"),
    Mutant("gate-window-late", "a go/no-go window opens one step after its edge", "dyrate_ref/demo/train.py",
           (("within < (steps if gate.after is None else gate.after)", "within <= (steps if gate.after is None else gate.after)"),),
           ("tests/test_demo.py",), where="go_no_go"),
    Mutant("gate-not-strict", "a strict gate passes at its floor", "dyrate_ref/demo/train.py",
           (("acc.get(m, 0) > f if gate.strict else", "acc.get(m, 0) >= f if gate.strict else"),), ("tests/test_demo.py",),
           where="go_no_go"),
    Mutant("train-into-existing-folder", "demo.train accepts an existing model folder as --out", "dyrate_ref/demo/train.py",
           (('check_new_folder(args.out, "--out")', 'args.out = args.out'),), ("tests/test_no_overwrite.py",), where="run"),
    Mutant("minutes-stage-2-only", "--minutes does not reach stage 1", "dyrate_ref/demo/train.py",
           (("deadline=None if minutes is None else t0 + minutes * 60", "deadline=None"),), ("tests/test_no_overwrite.py",),
           where="train"),
    Mutant("panels-evenly-spaced", "the run plot's patch panels skip the steps where the method cut", "dyrate_ref/plots.py",
           (("wanted = [0] + [t for t in range(1, T) if kept[t] < kept[t - 1]][:max(0, n - 2)] + [T - 1]", "wanted = [0, T - 1]"),),
           ("tests/test_plots.py",), where="panel_steps"),
    Mutant("cost-counts-reused", "the cost said before a resumed run counts the reused records again",
           "dyrate_ref/tools/report.py", (("runs = max(0, rows * items - reused)", "runs = rows * items"),), REPORT_TESTS,
           where="cost_line"),
    Mutant("trace-v1-unread", "a version-1 trace's kept masks are no longer found", "dyrate_ref/trace.py",
           (('if "visual_keep" in tensors and meta.get("format") != FORMAT:', 'if False:'),), ("tests/test_backend.py",),
           where="read_trace"),
    # The figures' data against the current weights (issue: a figure cannot outlive its model)
    Mutant("pareto-includes-control", "the Pareto figure draws the blank-image control as a method",
           "dyrate_ref/tools/report.py", (('if s["family"] == "control" or key not in s:', 'if key not in s:'),),
           REPORT_TESTS, where="pareto_points"),
    Mutant("pareto-own-costs", "the Pareto figure places rows at their own answers' costs, not none's",
           "dyrate_ref/tools/report.py", (('s.get("lm_flops_forced", s["lm_flops"])', 's["lm_flops"]'),),
           REPORT_TESTS, where="pareto_points"),
    Mutant("attention-over-generation-rows-shifted", "each answer's attention read one query late",
           "dyrate_ref/tools/data.py", (("probs[i][0, :, P - 1:, start:start + N]", "probs[i][0, :, P:, start:start + N]"),),
           FIGURE_TESTS, where="attention_over_generation"),
    Mutant("premise-kl-from-step-zero", "a cut from step s is charged the KL of the steps before it too",
           "dyrate_ref/tools/premise.py", (("d = kl_divergence(full[s:], cut[s:], torch.float64).clamp_min(0)",
                                            "d = kl_divergence(full, cut, torch.float64).clamp_min(0)"),),
           FIGURE_TESTS, where="cut_costs"),
]


def copy_project(dst: str):
    """The source, tests and small files; weights/ linked (30 MB, never edited by a mutant)."""
    for name in os.listdir(REPO):
        if name in (".git", ".venv", "runs", "weights", ".pytest_cache") or name.endswith(".egg-info"):
            continue
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, os.path.join(dst, name))
    os.symlink(os.path.join(REPO, "weights"), os.path.join(dst, "weights"))


def function_span(src: str, where: str) -> tuple[int, int] | None:
    """Character offsets of the definition `where` ("name", "Class.name" or a module-level constant's
    name) in src, or None."""
    *outer, name = where.split(".")
    tree = ast.parse(src)
    scopes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == outer[0]] if outer else [tree]
    for scope in scopes:
        for node in scope.body:
            named = (node.name == name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else
                     any(isinstance(t, ast.Name) and t.id == name for t in node.targets) if isinstance(node, ast.Assign)
                     else False)
            if named:
                lines = src.splitlines(keepends=True)
                start = sum(len(x) for x in lines[:node.lineno - 1])
                return start, sum(len(x) for x in lines[:node.end_lineno])
    return None


def locate(m: Mutant, root: str) -> tuple[str, int, int]:
    """-> (the file to edit, the span the edits must lie in)."""
    path = os.path.join(root, m.path)
    candidates = [path] if os.path.isfile(path) else []
    candidates += [p for p in sorted(glob.glob(os.path.join(root, "dyrate_ref", "**", "*.py"), recursive=True))
                   if p != path]
    for p in candidates:
        span = function_span(open(p).read(), m.where)
        if span:
            return p, *span
    raise SystemExit(f"mutant {m.name}: no function {m.where} in the package; the mutant list is out of date")


def apply(m: Mutant, root: str):
    path, start, end = locate(m, root)
    src = open(path).read()
    for old, new in m.edits:
        part = src[start:end]
        # inside the edit, any run of white space matches any other; its ends match as written
        core = old.strip()
        lead, trail = old[:len(old) - len(old.lstrip())], old[len(old.rstrip()):]
        pattern = re.escape(lead) + r"\s+".join(re.escape(w) for w in core.split()) + re.escape(trail)
        found = [mt.span() for mt in re.finditer(pattern, part)]
        if len(found) != 1:
            raise SystemExit(f"mutant {m.name}: {old!r} occurs {len(found)} times in {m.where}; "
                             "the mutant list is out of date")
        a, b = found[0]
        src = src[:start + a] + new + src[start + b:]
        end += len(new) - (b - a)
    with open(path, "w") as f:
        f.write(src)


def check(m: Mutant, full: bool) -> tuple[Mutant, bool, str, float]:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as root:
        copy_project(root)
        apply(m, root)
        env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf"]
        cmd += [] if full else list(m.tests)
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    caught = r.returncode == 1 and bool(failed)
    if r.returncode not in (0, 1):
        return m, False, f"pytest exited {r.returncode}: {r.stdout.strip().splitlines()[-1:] or r.stderr[-300:]}", time.time() - t0
    return m, caught, failed[0] if failed else "nothing failed", time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--jobs", type=int, default=2, help="mutants checked at once (default 2)")
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:26s} {m.path:26s} {m.why}")
        return 0
    # Check every edit applies before spending minutes on tests.
    with tempfile.TemporaryDirectory() as root:
        copy_project(root)
        for m in mutants:
            path, _, _ = locate(m, root)
            shutil.copy2(os.path.join(REPO, os.path.relpath(path, root)), path)
            apply(m, root)
    print(f"{len(mutants)} mutants, {args.jobs} at a time", flush=True)
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for m, caught, test, secs in pool.map(lambda m: check(m, args.full), mutants):
            results.append((m, caught))
            print(f"{'caught ' if caught else 'MISSED '} {m.name:26s} {secs:5.0f}s  {test}   ({m.why})", flush=True)
    missed = [m.name for m, caught in results if not caught]
    print(f"\n{len(results) - len(missed)} of {len(results)} mutants caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
