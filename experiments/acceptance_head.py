"""What the drafter's int8 LM head does to acceptance (issue 12, deliverable 5), by experiments/acceptance.py's
method, reduced: the first --prompts of its chat prompts, --new-tokens per row (min = max, so every setting
does the same work), T = 1, one `generate` per setting with `SpecRollout(mode="sd")`, drafters int8 / int4,
head "shared" (the target's f32 head) vs "int8", γ = --gamma, GGUF weights. Writes
experiments/results/acceptance_head_smollm2.json.

    python experiments/acceptance_head.py [--prompts 16] [--new-tokens 64] [--gamma 7] [--kernels native]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import PROMPTS  # noqa: E402
from common import machine, write_json, xla_cache  # noqa: E402


def summarize_run(out, gamma: int) -> dict:
    """τ and the pooled per-token acceptance α (accepted drafts / draft positions tested) of one generate."""
    import numpy as np
    from er_jax.controller import alpha_from_tau

    st = out.stats
    acc, reach = np.zeros(gamma), np.zeros(gamma)
    for r in st["step_records"]:
        if r["gamma"] > 0:
            acc[: r["gamma"]] += r["accepted_per_position"]
            reach[: r["gamma"]] += r["rows_reaching_position"]
    return {"gamma": gamma, "tau": st["tau"], "alpha_pooled": float(acc.sum() / reach.sum()),
            "alpha_from_tau": float(alpha_from_tau(st["tau"], gamma)),
            "acceptance_per_position": st["acceptance_per_position"], "accepted": st["accepted"],
            "drafted": st["drafted"], "sd_steps": st["sd_steps"], "tokens": st["tokens"], "wall_s": st["wall_s"],
            "drafter_derive_s": st["drafter_derive_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", default="native")
    ap.add_argument("--out", default="acceptance_head_smollm2.json")
    args = ap.parse_args()
    xla_cache.enable()  # warm-ups compile once per machine, not once per run
    import er_jax

    m = er_jax.load_model("smollm2")
    prompts = PROMPTS[: args.prompts]
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in prompts]
    n = len(ids)
    rc = er_jax.RolloutConfig(temperature=1.0, seed=args.seed)
    res = {"benchmark": "acceptance_head", "machine": machine(), "model": "smollm2 (GGUF dequantized to f32)",
           "setup": dict(prompts=n, new_tokens_per_row=args.new_tokens, gamma=args.gamma, temperature=1.0,
                         seed=args.seed, kernels=args.kernels, weights="gguf"), "results": {}}
    for drafter in ("int8", "int4"):
        for head in ("shared", "int8"):
            r = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=n, max_prompt_len=max(map(len, ids)),
                                   max_new_tokens=args.new_tokens, mode="sd", drafter=drafter,
                                   draft_length=args.gamma, kernels=args.kernels, drafter_head=head)
            t0 = time.perf_counter()
            out = r.generate(ids, rc, min_new_tokens=[args.new_tokens] * n)
            s = summarize_run(out, args.gamma)
            s["generate_wall_s_incl_compile"] = time.perf_counter() - t0
            s["drafter_bytes"] = r.drafter_bytes
            s["load_average"] = os.getloadavg()
            res["results"][f"{drafter}_{head}head"] = s
            print(f"{drafter} head={head:6s}: τ {s['tau']:.3f}  α pooled {s['alpha_pooled']:.4f}  "
                  f"({s['generate_wall_s_incl_compile']:.0f} s)", flush=True)
            write_json(args.out, res)
            del r
    for d in ("int8", "int4"):
        a, b = res["results"][f"{d}_sharedhead"], res["results"][f"{d}_int8head"]
        res.setdefault("tau_ratio_int8head_over_shared", {})[d] = b["tau"] / a["tau"]
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
