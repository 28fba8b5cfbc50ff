"""`er-jax` command line."""
from __future__ import annotations

import argparse
import json
import sys

from er_jax import calibration
from er_jax.rl import train

DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Explain photosynthesis in one sentence.", "What is 17 + 25?")


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=not sys.stderr.isatty(), leave=False)


def cmd_generate(args) -> int:
    import er_jax

    m = er_jax.load_model(args.model, dtype=args.dtype)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) if not args.raw else m.tokenizer.encode(p)
           for p in prompts]
    rollout = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=len(ids),
                                 max_prompt_len=max(len(i) for i in ids), max_new_tokens=args.max_new_tokens,
                                 mode=args.mode, drafter=args.drafter, draft_length=args.draft_length)
    rc = er_jax.RolloutConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    rollout.warmup(rc, prompt_lens=[len(i) for i in ids])  # compile outside the timed run
    with _progress(len(ids) * args.max_new_tokens, "generate") as bar:
        out = rollout.generate(ids, rc, progress=bar.update)
    rows = []
    for p, toks, n in zip(prompts, out.tokens, out.lengths):
        text = m.tokenizer.decode([int(t) for t in toks[:n]])
        rows.append({"prompt": p, "completion": text, "tokens": [int(t) for t in toks[:n]]})
        print(f"### {p}\n{text}\n")
    s = out.stats
    print(f"{int(out.lengths.sum())} tokens in {s['wall_s']:.2f} s: {s['tokens_per_s']:.1f} tokens/s "
          f"(mode={args.mode}, {s['steps']} steps, batch {len(ids)}, backend {s['kernels']})")
    if args.json:
        keep = {k: v for k, v in s.items() if k != "step_records"}
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rollout_config": vars(rc), "outputs": rows, "stats": keep}, f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="er-jax", description="System-aware self-speculative decoding for RL rollouts")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample completions for chat prompts and report tokens/s")
    g.add_argument("--model", default="smollm2", help='"smollm2", a .gguf file or a Hugging Face directory')
    g.add_argument("--prompt", action="append", help="a user message (repeatable); default: four sample prompts")
    g.add_argument("--raw", action="store_true", help="tokenize prompts as plain text (no chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="ar", choices=("ar", "sd", "toggle", "adaptive", "auto"))
    g.add_argument("--drafter", default="int4", choices=("int4", "int8"))
    g.add_argument("--draft-length", type=int, default=5)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--json", help="write prompts, completions and stats to this file")
    g.set_defaults(fn=cmd_generate)
    train.register(sub)  # train (GRPO)
    calibration.register(sub)  # sweep, calibrate, validate, predict, plot, bench
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"er-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
