"""GRPO with google-tunix's learner and er_jax as its rollout engine: SmolLM2-135M-Instruct on arithmetic word
problems (er_jax.rl.tasks.ArithmeticTask, reward 1 iff the last integer of the answer is right), on CPU.

    python experiments/tunix_grpo.py --out runs/tunix_grpo --steps 4 [--mode adaptive] [--drafter int4]

What it shows a tunix user: the policy is a tunix `Llama3` nnx model, trained by tunix's `GRPOLearner` through
`RLCluster`; the only er_jax-specific line is `rollout_engine=functools.partial(ErJaxRollout, mode=...)`.
Per step it writes one JSON line to <out>/metrics.jsonl (reward, accuracy, completion length, rollout time and
tokens/s, er_jax's speculation figures, the weight-sync and drafter-derivation times, and with --check-logps the
largest gap between the rollout's log-probs and tunix's own recomputation), then <out>/reward.png and
<out>/rollout.png. Needs the tunix extra: pip install -e ".[tunix]".

Two things a SmolLM2 user must know (docs/tunix.md): tunix 0.1.7's Llama 3 rotates with RoPE base 1e6 whatever
its config says (SmolLM2 needs 1e5), so this script calls `fix_tunix_llama3_rope()` before building the model; and
SmolLM2's pad token <|im_end|> occurs inside every chat prompt, which tunix would mask, so the tokenizer is given
<|endoftext|> (id 0) as its pad id.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory (metrics.jsonl, config.json, PNG plots)")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps (one rollout each)")
    ap.add_argument("--mode", default="adaptive", help="er_jax mode: ar, sd, toggle, adaptive, auto")
    ap.add_argument("--drafter", default="int4", help="int4 or int8")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4, help="GRPO group size G")
    ap.add_argument("--num-iterations", type=int, default=1, help="GRPO μ (> 1: tunix asks the rollout for "
                                                                  "old-policy log-probs)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 adds a frozen reference copy)")
    ap.add_argument("--seed", type=int, default=0, help="task seed (which problems)")
    ap.add_argument("--check-logps", action="store_true",
                    help="compare each rollout's log-probs with tunix's recomputation (one extra forward per step)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.generate import tokenizer_adapter
    from tunix.rl import common, rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    import er_jax
    from er_jax.integrations import tunix as T
    from er_jax.rl.tasks import ArithmeticTask, last_integer

    t_start = time.perf_counter()
    m = er_jax.load_model("smollm2")
    T.fix_tunix_llama3_rope()  # before the model is built or traced
    actor = T.tunix_model_from_weights(m.config, m.weights, "llama3")
    reference = T.tunix_model_from_weights(m.config, m.weights, "llama3") if args.beta > 0 else None
    pad_id, eos = 0, list(m.config.eos_ids)  # <|endoftext|> as pad (see the docstring); EOS <|im_end|>, <|endoftext|>
    tokenizer = tokenizer_adapter.TokenizerAdapter(T.TunixTokenizer(m.tokenizer, pad_id=pad_id))

    task = ArithmeticTask(m.tokenizer, seed=args.seed)
    n = args.prompts_per_step
    data = []
    for step in range(args.steps):
        exs = task.examples(step * n, n)
        data.append({"prompts": np.array([m.tokenizer.apply_chat_template([{"role": "user", "content": e.text}])
                                          for e in exs]),
                     "answer": np.array([e.answer for e in exs])})

    records: list[dict] = []
    holder: dict = {}

    def reward(prompts, completions, answer, **kw):
        r = [float(last_integer(c) == int(a)) for c, a in zip(completions, answer)]
        holder["rewards"] = r
        return r

    class Logged(T.ErJaxRollout):
        def generate(self, prompts, rollout_config=None, **kw):
            out = super().generate(prompts, rollout_config, **kw)
            st = self.last_stats
            rec = {"rollout": len(records), "rows": len(out.tokens), "rollout_s": st["wall_s"],
                   "tokens": st["tokens"], "tokens_per_s": st["tokens_per_s"], "engine_steps": st["steps"],
                   "sd_steps": st["sd_steps"], "sd_on_fraction": st["sd_on_fraction"], "tau": st.get("tau"),
                   "mean_completion_len": float(np.mean([len(t) for t in out.tokens])),
                   "weight_sync": self.update_times[-1] if self.update_times else None,
                   "elapsed_s": time.perf_counter() - t_start}
            if args.check_logps:
                comp = np.full((len(out.tokens), rollout_config.max_tokens_to_generate), pad_id, np.int32)
                for i, t in enumerate(out.tokens):
                    comp[i, : len(t)] = t
                model = holder["cluster"].actor_trainer.model
                ref = common.compute_per_token_logps(
                    nnx.graphdef(model), nnx.state(model), prompt_tokens=jnp.asarray(out.left_padded_prompt_tokens),
                    completion_tokens=jnp.asarray(comp), pad_id=pad_id, eos_id=self.eos_id(),
                    temperature=rollout_config.temperature)
                rec["max_abs_logp_diff_vs_tunix"] = max(
                    (float(np.abs(np.asarray(ref[i, : len(t)]) - out.logprobs[i]).max()) for i, t in
                     enumerate(out.tokens) if len(t)), default=0.0)
            records.append(rec)
            print(f"rollout {rec['rollout']}: {rec['rollout_s']:.1f} s, {rec['tokens_per_s']:.1f} tok/s, "
                  f"SD steps {rec['sd_steps']}/{rec['engine_steps']}"
                  + (f", max |Δ logp| {rec['max_abs_logp_diff_vs_tunix']:.1e}" if args.check_logps else ""),
                  flush=True)
            return out

    rc = base_rollout.RolloutConfig(max_tokens_to_generate=args.max_new_tokens, max_prompt_length=task.max_prompt_len,
                                    temperature=args.temperature, top_p=1.0, eos_tokens=eos, return_logprobs=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    roles = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine=functools.partial(Logged, mode=args.mode, drafter=args.drafter,
                                         max_batch=n * args.num_generations),
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.adamw(args.lr),
                                                        eval_every_n_steps=10**9,
                                                        max_steps=args.steps * args.num_iterations),
        rollout_config=rc)
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                                       cluster_config=cluster_config)
    holder["cluster"] = cluster
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=[reward],
        algo_config=grpo_learner.GRPOConfig(num_generations=args.num_generations, num_iterations=args.num_iterations,
                                            beta=args.beta))

    # rewards are computed right after each rollout: attach them to that rollout's record
    orig_reward = learner._compute_rewards

    def rewards_hook(*a, **kw):
        r = orig_reward(*a, **kw)
        if records:
            rr = np.asarray(r, np.float32)
            records[-1].update(reward_mean=float(rr.mean()), reward_std=float(rr.std()), accuracy=float((rr == 1).mean()))
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": len(records) - 1, **records[-1]}) + "\n")
        return r

    learner._compute_rewards = rewards_hook
    open(os.path.join(args.out, "metrics.jsonl"), "w").close()
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"args": vars(args), "model": "smollm2-135m-instruct (f32)", "task": task.describe(),
                   "machine": machine(), "rollout_engine": f"ErJaxRollout(mode={args.mode!r}, drafter={args.drafter!r})",
                   "tunix_llama3_rope_fixed": True, "pad_id": pad_id, "eos": eos}, f, indent=1)
    t0 = time.perf_counter()
    learner.train(data)
    print(f"trained {len(records)} steps in {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - t_start:.1f} s)")
    plot(records, args.out)


def plot(records, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["rollout"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [r.get("reward_mean", np.nan) for r in records], "o-", label="mean reward")
    ax.plot(steps, [r.get("accuracy", np.nan) for r in records], "s--", label="accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("tunix GRPO + er_jax rollouts: SmolLM2 arithmetic", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(steps, [r["rollout_s"] for r in records], label="rollout s (step 0 incl. compiles)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["sd_on_fraction"] for r in records], "ro-", label="SD-on fraction")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("rollout wall s")
    ax2.set_ylabel("SD-on fraction")
    fig.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rollout.png"), dpi=110)
    print("wrote", os.path.join(out, "metrics.jsonl"), os.path.join(out, "reward.png"),
          os.path.join(out, "rollout.png"))


if __name__ == "__main__":
    main()
