"""`er-jax train`: GRPO with speculative rollouts. Writes RUN_DIR/metrics.jsonl (one line per step),
RUN_DIR/config.json, PNG plots (reward, rollout time, τ and γ per step) and Orbax checkpoints in
RUN_DIR/checkpoints (every --save-every steps and at the end); --resume continues from the latest one.
--mesh DATA,MODEL trains (and rolls out) data- and tensor-parallel over DATA x MODEL devices; --distributed
first joins the processes of a multi-host run (er_jax.sharding.initialize_distributed)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from er_jax.cli import common
from er_jax.config import MODES
from er_jax.rl.tasks import TASKS

DEFAULT_LR = {"tiny-rl": 3e-3}  # others: 1e-6


def grpo_config_from_args(args):
    from er_jax.rl.grpo import GRPOConfig
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.preset or args.model or args.default_model, 1e-6)
    return GRPOConfig(prompts_per_step=args.prompts_per_step, samples=args.samples,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, lr=lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                      clip_eps=args.clip_eps, kl_coef=args.kl_coef, updates_per_rollout=args.updates_per_rollout,
                      micro_batch=args.micro_batch, seed=args.seed, mode=args.mode, draft_length=args.draft_length,
                      drafter=args.drafter, save_every=args.save_every)


def make_trainer(args, ckpt_dir: str | None = None):
    from er_jax.rl.grpo import Trainer
    from er_jax.rl.tasks import make_task
    from er_jax.sharding import parse_mesh

    cfg = grpo_config_from_args(args)
    m = common.load(args)
    config, weights, tokenizer = m.config, m.weights, m.tokenizer
    kw = {"max_operand": args.max_operand} if args.task == "arithmetic" else {}
    task = make_task(args.task, tokenizer=tokenizer, config=config, seed=args.seed,
                     max_new_tokens=cfg.max_new_tokens, **kw)
    return Trainer(config, weights, task, cfg, tokenizer=tokenizer, ckpt_dir=ckpt_dir,
                   calibration=args.calibration, mesh=parse_mesh(getattr(args, "mesh", None)))


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_train(args) -> int:
    from tqdm import tqdm

    from er_jax.plots import plot_run
    from er_jax.rl.grpo import write_jsonl
    from er_jax.sharding import parse_mesh, start_distributed

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    parse_mesh(args.mesh)  # a bad --mesh fails here, before anything starts
    if args.distributed:
        start_distributed()  # before any jax device is touched
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.jsonl")
    has_ckpt = os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))
    if has_ckpt and not args.resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that run or use a new --out")
    trainer = make_trainer(args, ckpt)
    history = []
    if args.resume and has_ckpt:
        start = trainer.restore()
        history = [m for m in _read_jsonl(metrics_path) if m["step"] < start]
        print(f"resumed from step {start} ({ckpt})", file=sys.stderr)
    write_jsonl(metrics_path, history, mode="w")  # drops lines of steps after the checkpoint (a killed run)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "args": vars(args) | {"fn": None}, "grpo": trainer.cfg.to_dict(),
                   "task": trainer.task.describe(), "model": trainer.config.name}, f, indent=1, default=str)
    if args.warmup:
        t0 = time.perf_counter()
        info = trainer.warmup()
        print(f"compiled in {time.perf_counter() - t0:.1f} s ({info})", file=sys.stderr)
    bar = tqdm(total=args.steps, initial=trainer.step_count, desc=f"train {args.mode}", unit="step",
               disable=args.no_progress)
    try:
        while trainer.step_count < args.steps:
            m = trainer.step()
            history.append(m)
            write_jsonl(metrics_path, [m])
            bar.set_postfix(reward=f"{m['reward']:.3f}", rollout=f"{m['rollout_s']:.1f}s",
                            tau=f"{m['tau']:.2f}" if m["tau"] else "-", sd=f"{m['sd_on_fraction']:.2f}")
            bar.update(1)
    finally:
        bar.close()
        plot_run(history, out, f"({trainer.config.name}, {args.task}, {args.mode})")
    if args.save_every:
        if trainer.latest_checkpoint() != trainer.step_count:
            trainer.save()
    trainer.close()
    last = history[-1] if history else {}
    n = len(history)
    if n:
        mean = lambda k: sum(h[k] for h in history) / n
        print(f"{trainer.step_count} steps: final reward {last['reward']:.3f}, rollout {mean('rollout_s'):.2f} s/step, "
              f"end-to-end {mean('step_s'):.2f} s/step, SD-on {mean('sd_on_fraction'):.2f}; metrics in {metrics_path}")
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="GRPO training with speculative rollouts (metrics, plots, checkpoints)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.model_args(t, default_model="smollm2")  # --preset tiny-rl: a tiny random model GRPO trains from scratch
    t.add_argument("--task", default="arithmetic", choices=TASKS)
    t.add_argument("--steps", type=int, default=10, help="total training steps (a resumed run continues)")
    t.add_argument("--mode", default="adaptive", choices=MODES)
    t.add_argument("--out", required=True, help="run directory: metrics.jsonl, plots, checkpoints/")
    t.add_argument("--prompts-per-step", type=int, default=4)
    t.add_argument("--samples", type=int, default=4, help="G: completions per prompt")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 3e-3 tiny-rl, 1e-6 otherwise)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--clip-eps", type=float, default=0.2)
    t.add_argument("--kl-coef", type=float, default=0.0, help="β of the k3 KL to the initial policy (0: off)")
    t.add_argument("--updates-per-rollout", type=int, default=1)
    t.add_argument("--micro-batch", type=int, default=None, help="rows per gradient chunk")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--draft-length", type=int, default=5)
    t.add_argument("--max-operand", type=int, default=20, help="arithmetic: operands in [1, this]")
    t.add_argument("--calibration", default=None, help="controller constants (JSON from a calibration run)")
    t.add_argument("--mesh", default=None, help="DATA,MODEL: data- x tensor-parallel device mesh, e.g. 2,4 "
                   "(default: one device)")
    t.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize from "
                   "ER_JAX_COORDINATOR / ER_JAX_NUM_PROCESSES / ER_JAX_PROCESS_ID, or ER_JAX_DISTRIBUTED=1")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--no-warmup", dest="warmup", action="store_false", help="compile lazily instead of up front")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)
