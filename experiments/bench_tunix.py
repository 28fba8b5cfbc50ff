"""tunix's own rollout engine (VanillaRollout: tunix.generate.Sampler) vs er_jax as a tunix engine (ErJaxRollout in
`ar` and `adaptive` modes), on the same f32 SmolLM2 weights and the same prompts, through the same BaseRollout
call a tunix RL loop makes (`generate(prompts, RolloutConfig)`).

    python experiments/bench_tunix.py [--batches 1 16] [--new-tokens 64] [--reps 3]

Needs the `tunix` extra (pip install -e ".[tunix]"). Workloads: greedy with EOS off (every row emits exactly
--new-tokens, identical work) at each batch size, and temperature 1 with EOS on at the largest batch (each
system's own samples; tokens/s counts what it emitted). Before timing, the three systems decode greedily at the
largest batch and their tokens are compared row by row, and their prompt ids are checked identical. Runs
alternate the systems (rotating the order each repeat) so load drifts hit them alike. tunix 0.1.7's Llama 3 uses
RoPE base 1e6 whatever its config says; SmolLM2 needs 1e5, so `fix_tunix_llama3_rope()` is applied first (the
size of the unpatched model's error is recorded). Writes experiments/results/bench_tunix_<machine>.json/.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ar import PROMPTS  # noqa: E402
from common import RESULTS, machine, machine_tag, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64, help="RolloutConfig.max_prompt_length")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default=None, help="er_jax op backend (SpecRollout's kernels=); default: the "
                                                   "platform's")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import tunix
    from tunix.generate import tokenizer_adapter
    from tunix.rl.rollout import base_rollout, vanilla_rollout

    import er_jax
    from er_jax.integrations import tunix as T

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    m = er_jax.load_model("smollm2")
    cfg = m.config
    # pad = <|endoftext|> (0): SmolLM2's own pad is <|im_end|> (2), which its chat template puts inside every prompt,
    # and tunix masks every prompt token equal to the pad id.
    tok = tokenizer_adapter.TokenizerAdapter(T.TunixTokenizer(m.tokenizer, pad_id=0))

    # tunix's RoPE base: how far the unpatched tunix Llama 3 is from the weights' reference
    probe = jnp.asarray([m.tokenizer.chat([{"role": "user", "content": PROMPTS[0]}])])
    ref_logits = er_jax.forward(cfg, m.weights, probe)
    from tunix.sft import utils as sft_utils

    def tunix_logits(model, toks):
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
        return model(toks, pos, None, sft_utils.make_causal_attn_mask(jnp.ones(toks.shape, bool)))[0]

    unpatched = T.tunix_model_from_weights(cfg, m.weights, "llama3")
    bug_diff = float(jnp.abs(tunix_logits(unpatched, probe) - ref_logits).max())
    bug_agree = float((jnp.argmax(tunix_logits(unpatched, probe), -1) == jnp.argmax(ref_logits, -1)).mean())
    del unpatched
    patched = T.fix_tunix_llama3_rope()
    model = T.tunix_model_from_weights(cfg, m.weights, "llama3")
    fixed_diff = float(jnp.abs(tunix_logits(model, probe) - ref_logits).max())
    print(f"tunix Llama3 vs reference logits: unpatched max |diff| {bug_diff:.3g} (argmax agreement {bug_agree:.2f}), "
          f"after fix_tunix_llama3_rope {fixed_diff:.2g}", flush=True)

    bmax = max(args.batches)
    texts = [m.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
             for i in range(bmax)]
    eos = list(cfg.eos_ids)
    base = dict(max_tokens_to_generate=args.new_tokens, max_prompt_length=args.prompt_len,
                kv_cache_size=args.prompt_len + args.new_tokens)
    greedy = base_rollout.RolloutConfig(**base, top_p=None, temperature=0.0, eos_tokens=[-1])  # EOS off
    sample = lambda seed: base_rollout.RolloutConfig(**base, temperature=1.0, top_p=1.0, eos_tokens=eos,
                                                     seed=jax.random.PRNGKey(seed))

    spec_kw = {"kernels": args.backend} if args.backend else {}
    systems = {
        "tunix_vanilla": vanilla_rollout.VanillaRollout(model, tok, base_rollout.CacheConfig(
            cache_size=args.prompt_len + args.new_tokens, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim)),
        "er_jax_ar": T.ErJaxRollout(rollout_actor=model, tokenizer=tok, rollout_config=greedy, mode="ar",
                                    max_batch=bmax, spec_rollout_kwargs=spec_kw),
        "er_jax_adaptive": T.ErJaxRollout(rollout_actor=model, tokenizer=tok, rollout_config=greedy,
                                          mode="adaptive", max_batch=bmax, spec_rollout_kwargs=spec_kw),
    }
    names = list(systems)
    print(f"setup {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. greedy agreement at the largest batch (this also compiles the greedy programs)
    outs = {}
    for n in names:
        ts = time.perf_counter()
        outs[n] = systems[n].generate(texts, greedy)
        print(f"greedy warm-up {n}: {time.perf_counter() - ts:.1f} s", flush=True)
    same_prompts = all((outs[n].left_padded_prompt_tokens == outs[names[0]].left_padded_prompt_tokens).all()
                       for n in names)
    agreement = {}
    for n in names[1:]:
        rows = [bool(np.array_equal(a, b)) for a, b in zip(outs[names[0]].tokens, outs[n].tokens)]
        first = [int(np.argmax(a != b)) for a, b, ok in zip(outs[names[0]].tokens, outs[n].tokens, rows) if not ok]
        agreement[f"{names[0]}_vs_{n}"] = {"rows_equal": int(sum(rows)), "rows": len(rows),
                                          "first_mismatch_positions": first}
    print("identical prompt ids:", same_prompts, "| greedy agreement:", agreement, flush=True)

    # 2. timing, systems alternated
    workloads = [(f"greedy_b{b}", b, lambda rep: greedy) for b in sorted(args.batches)]
    workloads.append((f"t1_eos_b{bmax}", bmax, lambda rep: sample(rep)))
    rows = []
    for wname, b, rc_of in workloads:
        prompts = texts[:b]
        for n in names:  # compile this batch size / sampling config
            systems[n].generate(prompts, rc_of(-1))
        rec = {n: {"wall_s": [], "tokens": [], "er_jax_sd_steps": [], "er_jax_steps": []} for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for n in order:
                ts = time.perf_counter()
                out = systems[n].generate(prompts, rc_of(rep))
                dt = time.perf_counter() - ts
                rec[n]["wall_s"].append(dt)
                rec[n]["tokens"].append(int(sum(len(t) for t in out.tokens)))
                st = getattr(systems[n], "last_stats", None)
                if st is not None:
                    rec[n]["er_jax_sd_steps"].append(int(st["sd_steps"]))
                    rec[n]["er_jax_steps"].append(int(st["steps"]))
        row = {"workload": wname, "batch": b, "new_tokens": args.new_tokens,
               "sampling": "greedy, EOS off" if wname.startswith("greedy") else "T=1, top_p=1, EOS on"}
        for n in names:
            tps = [t / w for t, w in zip(rec[n]["tokens"], rec[n]["wall_s"])]
            row[n] = {**rec[n], "tokens_per_s": tps, "median_tokens_per_s": float(np.median(tps)),
                      "best_tokens_per_s": float(max(tps))}
        v = row["tunix_vanilla"]["median_tokens_per_s"]
        for n in names[1:]:
            row[f"{n}_speedup_median"] = row[n]["median_tokens_per_s"] / v
            row[f"{n}_speedup_best"] = row[n]["best_tokens_per_s"] / row["tunix_vanilla"]["best_tokens_per_s"]
        rows.append(row)
        print(f"{wname:14s} " + "  ".join(f"{n} {row[n]['median_tokens_per_s']:7.1f} tok/s" for n in names)
              + "  |  " + "  ".join(f"{n[7:]} x{row[f'{n}_speedup_median']:.2f}" for n in names[1:]), flush=True)

    payload = {"benchmark": "bench_tunix", "model": "smollm2-135m-instruct (GGUF dequantized to f32)",
               "machine": machine(), "tunix": getattr(tunix, "__version__", "0.1.7"),
               "systems": {"tunix_vanilla": "tunix.rl.rollout.vanilla_rollout.VanillaRollout (tunix.generate.Sampler)",
                           "er_jax_ar": "er_jax.integrations.tunix.ErJaxRollout(mode='ar')",
                           "er_jax_adaptive": "ErJaxRollout(mode='adaptive', drafter='int4')"},
               "method": "BaseRollout.generate(prompts, RolloutConfig) wall time per call incl. tokenization and "
                         "host transfer; systems alternated per repeat; tokens/s = emitted tokens (EOS excluded, as "
                         "tunix returns them) / wall; median and best of the repeats",
               "reps": args.reps, "prompt_len": args.prompt_len,
               "pad_id": "0 (<|endoftext|>): tunix masks prompt tokens equal to the pad id, and SmolLM2's pad "
                         "<|im_end|> occurs in every chat prompt",
               "tunix_llama3_rope": {"note": "tunix 0.1.7's Llama 3 rotates with base 1e6 whatever config.rope_theta "
                                             "says; SmolLM2 needs 1e5. fix_tunix_llama3_rope() was applied.",
                                     "patched": patched, "unpatched_max_logit_diff": bug_diff,
                                     "unpatched_argmax_agreement": bug_agree, "patched_max_logit_diff": fixed_diff},
               "er_jax_backend": systems["er_jax_ar"].last_stats.get("kernels"),
               "identical_prompt_ids": bool(same_prompts), "greedy_agreement": agreement,
               "load_average_start": load_start, "load_average_end": os.getloadavg(),
               "total_s": time.perf_counter() - t0, "rows": rows}
    path = write_json(f"bench_tunix_{machine_tag()}.json", payload)
    print("wrote", path)
    plot(payload, os.path.join(RESULTS, f"bench_tunix_{machine_tag()}.png"))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["tunix_vanilla", "er_jax_ar", "er_jax_adaptive"]
    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(rows))
    for i, n in enumerate(names):
        med = [r[n]["median_tokens_per_s"] for r in rows]
        lo = [r[n]["median_tokens_per_s"] - min(r[n]["tokens_per_s"]) for r in rows]
        hi = [max(r[n]["tokens_per_s"]) - r[n]["median_tokens_per_s"] for r in rows]
        ax.bar(x + (i - 1) * 0.27, med, 0.27, yerr=[lo, hi], capsize=3, label=n)
    ax.set_xticks(x, [r["workload"] for r in rows])
    ax.set_ylabel("tokens / s (median, range)")
    ax.set_title(f"SmolLM2-135M f32, {payload['machine']['platform']}, tunix {payload['tunix']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
