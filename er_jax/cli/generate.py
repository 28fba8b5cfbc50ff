"""`er-jax generate`: sample completions for chat prompts and report tokens/s."""
from __future__ import annotations

import json
import sys

from er_jax.cli import common
from er_jax.config import MODES

DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Explain photosynthesis in one sentence.", "What is 17 + 25?")


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=not sys.stderr.isatty(), leave=False)


def cmd_generate(args) -> int:
    import er_jax

    m = common.load(args)
    if m.tokenizer is None:
        raise ValueError(f"generate needs a model with a tokenizer; {m.source} has none")
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) if not args.raw else m.tokenizer.encode(p)
           for p in prompts]
    rollout = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=len(ids),
                                 max_prompt_len=max(len(i) for i in ids), max_new_tokens=args.max_new_tokens,
                                 mode=args.mode, drafter=args.drafter, draft_length=args.draft_length,
                                 **({"drafter_head": args.drafter_head} if getattr(args, "drafter_head", None) else {}))
    rc = er_jax.RolloutConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    rollout.warmup(rc, prompts=ids)  # compile outside the timed run
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
            json.dump({"model": m.source, "rollout_config": vars(rc), "outputs": rows, "stats": keep}, f, indent=1)
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="sample completions for chat prompts and report tokens/s")
    g.add_argument("--prompt", action="append", help="a user message (repeatable); default: four sample prompts")
    g.add_argument("--raw", action="store_true", help="tokenize prompts as plain text (no chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="ar", choices=MODES)
    g.add_argument("--draft-length", type=int, default=5)
    common.model_args(g, default_model="smollm2")
    g.add_argument("--json", help="write prompts, completions and stats to this file")
    g.set_defaults(fn=cmd_generate)
