"""`sd` vs `ar` tokens/s at batch 1 on CPU (issue 12 target: >= 1.6x with the int8 drafter, γ = 7, T = 1,
SmolLM2 chat prompts), native backend by default. Each of --prompts chat prompts is decoded alone for
--new-tokens tokens (EOS ignored: same work for both), the two modes alternating per prompt (order reversed
every other one). Writes experiments/results/sd_batch1_cpu.json.

    python experiments/sd_batch1.py [--prompts 4] [--new-tokens 64] [--gamma 7] [--drafter int8] [--head int8]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import PROMPTS  # noqa: E402
from common import machine, write_json, xla_cache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--drafter", default="int8")
    ap.add_argument("--head", default="int8")
    ap.add_argument("--kernels", default="native")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="sd_batch1_cpu.json")
    args = ap.parse_args()
    xla_cache.enable()  # warm-ups compile once per machine, not once per run
    import er_jax

    m = er_jax.load_model("smollm2", dtype=args.dtype)
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    plen = max(map(len, ids))
    rollouts = {mode: er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=1, max_prompt_len=plen,
                                         max_new_tokens=args.new_tokens, mode=mode, drafter=args.drafter,
                                         draft_length=args.gamma, kernels=args.kernels, drafter_head=args.head)
                for mode in ("ar", "sd")}
    rc = er_jax.RolloutConfig(temperature=1.0, eos_ids=())
    for r in rollouts.values():
        r.warmup(rc, prompt_lens=[len(i) for i in ids])
    runs = []
    for i, p in enumerate(ids):
        for mode in (("ar", "sd") if i % 2 == 0 else ("sd", "ar")):
            load = os.getloadavg()
            out = rollouts[mode].generate([p], er_jax.RolloutConfig(temperature=1.0, eos_ids=(), seed=i))
            s = out.stats
            runs.append(dict(prompt=i, mode=mode, wall_s=s["wall_s"], tokens=s["tokens"],
                             tokens_per_s=s["tokens_per_s"], tau=s["tau"], load_1min=load[0]))
            print(f"prompt {i} {mode}: {s['tokens_per_s']:6.1f} tok/s (τ {s['tau']}, load {load[0]:.1f})", flush=True)
    tps = {mode: [r["tokens_per_s"] for r in runs if r["mode"] == mode] for mode in ("ar", "sd")}
    ratios = [runs[j]["tokens_per_s"] / runs[j ^ 1]["tokens_per_s"] if runs[j]["mode"] == "sd" else None
              for j in range(len(runs))]
    res = {"benchmark": "sd_batch1", "machine": machine(), "args": vars(args), "runs": runs,
           "tokens_per_s": {k: {"median": float(np.median(v)), "fastest": float(max(v))} for k, v in tps.items()},
           "sd_over_ar_median": float(np.median(tps["sd"]) / np.median(tps["ar"])),
           "sd_over_ar_per_prompt": [x for x in ratios if x is not None]}
    print(res["tokens_per_s"], "sd/ar", res["sd_over_ar_median"])
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
