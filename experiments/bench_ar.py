"""AR decode throughput: er_jax vs transformers' `generate` (torch CPU) on SmolLM2, plus the per-step time
against the memory roofline (weight bytes + KV bytes per step over the copy bandwidth, timed in the same
rotation as the systems: this VM's bandwidth moves by 1.5x within minutes).

    python experiments/bench_ar.py [--batches 1 16] [--new-tokens 64]
    python experiments/bench_ar.py --presets qwen2.5-1.5b qwen2.5-7b --batches 1 8 32 64   # GPU: real shapes

Both systems decode greedily the same chat prompts for exactly the same number of new tokens (EOS does
not stop either), in f32. Writes experiments/results/bench_ar_<machine>.json and prints a table.

With --presets (for a GPU; the SmolLM2 / transformers comparison is skipped): random weights of a real model's
shapes in the backend's dtype (bf16 on GPU), the engine's jitted AR step timed at each batch size with
--context cached tokens per row (er_jax.sweep.sweep), against the memory roofline: weight bytes +
the K/V the step reads, over the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, machine, machine_tag, read_bandwidth, write_json, xla_cache  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "List three prime numbers.", "What is 17 + 25?", "Translate 'good morning' into Spanish.",
           "Name a famous painter.", "Why is the sky blue?"]


def er_jax_runner(m, ids, new_tokens, kernels=None):
    """A compiled AR SpecRollout; each call of the returned function is one timed generate."""
    import er_jax

    r = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=len(ids),
                           max_prompt_len=max(map(len, ids)), max_new_tokens=new_tokens, mode="ar", kernels=kernels)
    rc = er_jax.RolloutConfig(temperature=0.0)
    force = [new_tokens] * len(ids)  # identical work: no row stops early
    r.generate(ids, rc, min_new_tokens=force)  # compile
    return (lambda: r.generate(ids, rc, min_new_tokens=force)), r


def er_jax_run(m, ids, new_tokens, reps, kernels=None):
    run, r = er_jax_runner(m, ids, new_tokens, kernels)
    outs = [run() for _ in range(reps)]
    best = min(outs, key=lambda o: o.stats["wall_s"])
    recs = best.stats["step_records"]
    step_s = float(np.median([s["wall_s"] for s in recs]))
    return best, step_s, r


def hf_run(m_path, gguf_file, ids, new_tokens, reps, pad_id, dtype="float32"):
    return min(hf_runner(m_path, gguf_file, ids, new_tokens, pad_id, dtype)() for _ in range(reps))


def hf_runner(m_path, gguf_file, ids, new_tokens, pad_id, dtype="float32"):
    """transformers' generate on CPU torch, warmed up; each call of the returned function times one generate."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(m_path, gguf_file=gguf_file, dtype=getattr(torch, dtype)).eval()
    width = max(map(len, ids))
    inp = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id)
    with torch.no_grad():
        model.generate(inp, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(inp, **kw)
            return time.perf_counter() - t0

    return run


def preset_rows(presets, batches, context: int, reps: int, bw: float) -> list[dict]:
    """AR step time of random-weight real-size shapes vs the memory roofline (one row per preset x batch)."""
    from er_jax.cli.common import default_dtype
    from er_jax.io.registry import load_model
    from er_jax.sweep import sweep
    from er_jax.controller import ModelCosts

    rows = []
    for name in presets:
        m = load_model(preset=name, dtype=default_dtype())
        costs = ModelCosts.from_config(m.config)
        for rec in sweep(m.config, m.weights, batches=batches, contexts=[context], gammas=[0], reps=reps,
                         progress=False):
            step_bytes = costs.target_bytes + costs.kv_bytes_per_token * rec["batch"] * context
            roof = step_bytes / bw
            rows.append({"preset": name, "dtype": m.config.dtype, "batch": rec["batch"], "context": context,
                         "step_ms": 1e3 * rec["wall_s"], "roofline_step_ms": 1e3 * roof,
                         "fraction_of_roofline": roof / rec["wall_s"], "step_bytes": step_bytes})
            print(f"{name:14s} B={rec['batch']:3d} S={context}: step {1e3 * rec['wall_s']:7.2f} ms vs roofline "
                  f"{1e3 * roof:7.2f} ms ({roof / rec['wall_s']:.0%})", flush=True)
        del m
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--presets", nargs="+", help="time these shape presets (random weights) instead of SmolLM2")
    ap.add_argument("--context", type=int, default=1024, help="--presets: cached tokens per row")
    ap.add_argument("--kernels", nargs="+", default=["xla", "native"], help="er_jax backends compared")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", help="file under experiments/results/ (default bench_ar_<machine>.json)")
    args = ap.parse_args()
    xla_cache.enable()  # warm-ups compile once per machine, not once per run
    if args.presets:
        bw = copy_bandwidth()
        rows = preset_rows(args.presets, args.batches, args.context, max(args.reps, 5), bw)
        payload = {"benchmark": "bench_ar_presets", "machine": machine(), "copy_bandwidth_GBps": bw / 1e9,
                   "rows": rows}
        print("wrote", write_json(f"bench_ar_presets_{machine_tag()}.json", payload))
        return

    import er_jax
    from er_jax.io.registry import smollm2_path
    from er_jax.controller import ModelCosts

    path = smollm2_path()
    bw_start, read_bw = copy_bandwidth(), read_bandwidth()
    rows = []
    for dtype in args.dtypes:
        m = er_jax.load_model("smollm2", dtype=dtype)
        costs = ModelCosts.from_config(m.config, "int4")
        for b in args.batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
            ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in prompts]
            systems = {k: er_jax_runner(m, ids, args.new_tokens, k)[0] for k in args.kernels}
            hf = hf_runner(os.path.dirname(path), os.path.basename(path), ids, args.new_tokens, m.config.pad_id, dtype)
            walls, steps, loads = {k: [] for k in [*systems, "transformers"]}, {k: [] for k in systems}, []
            bws = []  # copy bandwidth in the same rotation: this VM's moves by 1.5x within minutes
            for rep in range(args.reps):  # the systems alternate, order reversed every other repeat
                order = [*systems, "transformers", "bandwidth"]
                for k in order if rep % 2 == 0 else order[::-1]:
                    loads.append(os.getloadavg()[0])
                    if k == "bandwidth":
                        bws.append(copy_bandwidth(1 << 28))
                    elif k == "transformers":
                        walls[k].append(hf())
                    else:
                        out = systems[k]()
                        walls[k].append(out.stats["wall_s"])
                        steps[k].append(float(np.median([s["wall_s"] for s in out.stats["step_records"]])))
            # Memory roofline of one decode step: every weight the step reads once (embedding rows are a
            # gather, so only the LM head, projections and norms) + the K/V the attention reads.
            ctx = float(np.mean([len(i) for i in ids])) + args.new_tokens / 2
            step_bytes = costs.target_bytes + costs.kv_bytes_per_token * b * ctx
            tok = b * args.new_tokens
            bw = float(np.median(bws))
            hf_tps = tok / np.median(walls["transformers"])
            row = {"batch": b, "dtype": dtype, "new_tokens": args.new_tokens, "load_1min": loads,
                   "transformers_tokens_per_s": {"median": hf_tps, "fastest": tok / min(walls["transformers"])},
                   "roofline_step_ms": 1e3 * step_bytes / bw, "step_bytes": step_bytes,
                   "copy_bandwidth_GBps_repeats": [v / 1e9 for v in bws], "er_jax": {}}
            for k in systems:
                tps = tok / np.median(walls[k])
                step_s = float(np.median(steps[k]))
                row["er_jax"][k] = {"tokens_per_s": {"median": tps, "fastest": tok / min(walls[k])},
                                    "speedup_vs_transformers_median": tps / hf_tps,
                                    "step_ms_median": 1e3 * step_s, "step_ms_fastest": 1e3 * min(steps[k]),
                                    "fraction_of_roofline": (step_bytes / bw) / step_s,
                                    "fraction_of_roofline_fastest": (step_bytes / bw) / min(steps[k]),
                                    "step_GBps": step_bytes / step_s / 1e9}
                print(f"{dtype} batch {b:3d} {k:6s}: er_jax {tps:8.1f} tok/s  transformers {hf_tps:8.1f} tok/s  "
                      f"x{tps / hf_tps:.2f}   step {1e3 * step_s:.1f} ms vs roofline {1e3 * step_bytes / bw:.1f} ms "
                      f"(load {np.mean(loads):.1f})", flush=True)
            rows.append(row)
    payload = {"benchmark": "bench_ar", "model": "smollm2 (GGUF dequantized)", "machine": machine(),
               "copy_bandwidth_GBps_at_start": bw_start / 1e9, "read_bandwidth_GBps_at_start": read_bw / 1e9,
               "step_bytes": "weights a decode step reads (projections, LM head, norms) + the K/V it attends over",
               "roofline": "step_bytes / copy bandwidth (read + write counted, as before; each row's median of "
                           "256 MiB copies timed in its repeats' rotation)",
               "load_average_at_end": os.getloadavg(), "rows": rows}
    print("wrote", write_json(args.out or f"bench_ar_{machine_tag()}.json", payload))


if __name__ == "__main__":
    main()
