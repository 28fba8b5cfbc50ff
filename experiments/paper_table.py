"""The paper's Table 1 for our stack: the same GRPO run (same seeds, same prompts, same initial weights) with
rollouts under each mode — ar (plain decode), sd (always speculate, fixed γ), toggle (roofline toggle),
adaptive (toggle + γ ladder: EfficientRollout), auto (ours) — and per mode: rollout s/step, end-to-end s/step,
reduction vs ar, mean τ, mean γ, SD-on fraction, drafter derivation time, final reward.

    python experiments/paper_table.py                 # --scale cpu: SmolLM2, int8 drafter, 2 prompts x 4 samples, 160 tokens, 10 steps
    python experiments/paper_table.py --scale cpu-tail  # the same, 1 prompt x 4 samples, 256 tokens (rollout ~30% of a step)
    python experiments/paper_table.py --scale gpu     # SmolLM2, 32 prompts x 8 samples, 512 tokens, 30 steps
    python experiments/paper_table.py --scale tiny    # the tiny from-scratch setting (a smoke run)

Modes run in lockstep by default (step k of every mode before step k+1 of any), so a drift in the load of a
shared machine hits every mode alike, and the order within a round rotates from round to round, so no mode
always runs first or after the same one; between its steps a trainer waits offloaded to disk, so memory holds one
trainer at a time. `--sequential` runs one mode after the other. Extra ar runs
that differ only in their rollout streams (`--noise-seeds`) measure the run-to-run noise of the reward curve. Compiles
happen in a warm-up before the timed steps and are reported separately.

Reward overlay (losslessness in training): speculative rollouts draw different but identically distributed
samples, so reward curves agree only within noise, and once samples differ the weights differ too, so the noise
is that of whole training runs, not only of one step's samples. Per step k we compare d_k = r_mode,k - r_ar,k
with σ_k = sqrt(2) x (std at step k over the ar runs that differ only in rollout streams), floored at the
two-sample binomial std sqrt(2 p̄_k (1 - p̄_k) / n) (n rows per step); a mode overlays ar when every
|d_k| <= 3 σ_k and its mean reward over the run is within 3 std of ar's (std of the ar runs' mean rewards,
same floor). The same test applied to the extra ar runs shows how it behaves when the null hypothesis holds.

Writes experiments/results/paper_table_<scale>.{json,md} and paper_table_<scale>_{reward,rollout,tau_gamma}.png.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, write_json, xla_cache  # noqa: E402

MODES = ("ar", "sd", "toggle", "adaptive", "auto")
PRESETS = {
    # 2 shared CPU cores. The platform's layout (per-layer, panel-major on the native backend): the stacked
    # one compiled faster under the XLA backend, but on the native backend it runs row-major matmuls on
    # per-layer slice copies. 160 tokens: at 48 the cap cut most responses (mean 38.5), the batch stayed at 8 rows
    # (this CPU's SD-on boundary) and there was no tail; at 160 responses average 53-114 tokens per step against
    # a longest row of 114-159: the batch shrinks well before a rollout ends.
    # int8 drafter: SmolLM2-135M keeps α 0.98 under int8 but 0.79-0.81 under int4 (README, "Acceptance").
    # 10 steps: at 6 the spread of ar's own re-runs (rollout s/step ±7%) was larger than the effect measured.
    "cpu": dict(model="smollm2", task="arithmetic", prompts_per_step=2, samples=4, max_new_tokens=160, steps=10,
                lr=1e-6, dtype="float32", layout=None, max_operand=10, noise_seeds=2, drafter="int8"),
    # The same on fewer, longer rows: 1 prompt x 4 samples up to 256 tokens. Training pads every row to the cap, so
    # its cost follows rows x cap (4 x 256 < 8 x 160) while the rollout's follows the longest row: the rollout is a
    # larger share of the step (~20% in "cpu"; the paper's A100 steps spend 57-68% in rollout), and 4 rows sit
    # inside this CPU's SD-on boundary.
    "cpu-tail": dict(model="smollm2", task="arithmetic", prompts_per_step=1, samples=4, max_new_tokens=256, steps=10,
                     lr=1e-6, dtype="float32", layout=None, max_operand=10, noise_seeds=2, drafter="int8"),
    # One accelerator: a real RL batch with long responses (the long tail the paper targets).
    "gpu": dict(model="smollm2", task="arithmetic", prompts_per_step=32, samples=8, max_new_tokens=512, steps=30,
                lr=1e-6, dtype="float32", layout=None, max_operand=20, noise_seeds=2, drafter="int8"),
    # The from-scratch setting: seconds per step on a CPU.
    "tiny": dict(model="preset:tiny-rl", task="tiny", prompts_per_step=4, samples=8, max_new_tokens=16, steps=20, lr=5e-3,
                 dtype="float32", layout="stacked", max_operand=None, noise_seeds=4, drafter="int4"),
}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# Constants under which every step looks memory-bound: toggle / adaptive / auto speculate throughout. For
# exercising the trainer with speculation on a machine where the honest cost model says it does not pay.
FORCED = {"bw": 1e6, "flops": 1e15, "platform": "forced-memory-bound"}


def calibration_record(src):
    """The controller constants a run used (None: the platform defaults)."""
    if not src:
        return None
    from er_jax.controller import load_calibration
    hw, records = load_calibration(src)
    return {"source": src if isinstance(src, str) else "--force-speculation", "hardware": hw.to_dict(),
            "records": len(records)}


def run_specs(args, modes) -> list[tuple[str, str, int | None]]:
    """(run name, mode, sampling seed): each mode with the run's seed, plus `noise_seeds` extra ar runs that differ
    only in the rollout streams (same initial weights, same prompts): the run-to-run noise of the reward curve."""
    specs = [(m, m, None) for m in modes]
    specs += [(f"ar~{i}", "ar", args.seed + 1000 * i) for i in range(1, args.noise_seeds + 1)]
    return specs


def make_trainers(args, specs):
    import jax

    from er_jax.rl.grpo import GRPOConfig, Trainer
    from er_jax.rl.tasks import make_task
    from er_jax.io.registry import load_model

    m = load_model(args.model, args.dtype, seed=args.seed)
    config, weights, tokenizer = m.config, m.weights, m.tokenizer
    weights = jax.tree_util.tree_map(lambda a: a.astype(config.jnp_dtype), weights)
    trainers = {}
    for name, mode, sampling_seed in specs:
        cfg = GRPOConfig(prompts_per_step=args.prompts_per_step, samples=args.samples,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr,
                         seed=args.seed, sampling_seed=sampling_seed, mode=mode, draft_length=args.draft_length,
                         drafter=args.drafter)
        kw = {"max_operand": args.max_operand} if args.task == "arithmetic" and args.max_operand else {}
        task = make_task(args.task, tokenizer=tokenizer, config=config, seed=args.seed,
                         max_new_tokens=cfg.max_new_tokens, **kw)
        trainers[name] = Trainer(config, weights, task, cfg, tokenizer=tokenizer, calibration=args.calibration,
                                 layout=args.layout)
    return config, trainers


def summarize(metrics: list[dict], warm: dict) -> dict:
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    taus = [m["tau"] for m in metrics if m["tau"] is not None]
    gammas = [m["gamma_mean"] for m in metrics if m["sd_steps"]]
    derive = [m["drafter_derive_s"] for m in metrics if m["drafter_derive_s"]]
    k = max(1, len(metrics) // 4)
    return dict(steps=len(metrics), rollout_s_per_step=mean([m["rollout_s"] for m in metrics]),
                train_s_per_step=mean([m["train_s"] for m in metrics]),
                e2e_s_per_step=mean([m["step_s"] for m in metrics]),
                tokens_per_step=mean([m["tokens"] for m in metrics]),
                rollout_tokens_per_s=sum(m["tokens"] for m in metrics) / sum(m["rollout_s"] for m in metrics),
                tau_mean=mean(taus), gamma_mean=mean(gammas),
                sd_on_fraction=mean([m["sd_on_fraction"] for m in metrics]),
                drafter_derive_s=mean(derive), reward_mean=mean([m["reward"] for m in metrics]),
                final_reward=mean([m["reward"] for m in metrics[-k:]]), final_reward_steps=k,
                logp_max_abs_diff=max(m["logp_max_abs_diff"] for m in metrics), **warm)


def overlay(refs: list[list[dict]], other: list[dict], rows: int) -> dict:
    """Is `other`'s reward curve within noise of the ar curve refs[0]? refs: ar runs differing only in their
    rollout streams (refs[0] shares every seed with `other`). See the module docstring."""
    r = np.array([[m["reward"] for m in run] for run in refs])  # [R, steps]
    o = np.array([m["reward"] for m in other])
    n_steps = min(r.shape[1], len(o))
    r, o = r[:, :n_steps], o[:n_steps]
    d = o - r[0]
    p = (o + r[0]) / 2
    binom = np.maximum(np.sqrt(2 * p * (1 - p) / rows), 1.0 / rows)
    run_sd = r.std(0, ddof=1) if len(r) > 1 else np.zeros(n_steps)
    sig = np.maximum(np.sqrt(2) * run_sd, binom)
    means = r.mean(1)
    pm = (o.mean() + means[0]) / 2
    sig_mean = max(np.sqrt(2) * (means.std(ddof=1) if len(means) > 1 else 0.0),
                   math.sqrt(2 * pm * (1 - pm) / (rows * n_steps)), 1.0 / (rows * n_steps))
    worst = float(np.max(np.abs(d) / sig)) if n_steps else 0.0
    z = float((o.mean() - means[0]) / sig_mean) if n_steps else 0.0
    return dict(diff_per_step=d.tolist(), sigma_per_step=sig.tolist(), binomial_sigma_per_step=binom.tolist(),
                run_to_run_sd_per_step=run_sd.tolist(), ar_runs=len(r), max_abs_diff_over_sigma=worst,
                mean_reward_diff=float(o.mean() - means[0]), mean_reward_z=z, identical=bool(np.all(d == 0)),
                overlaid=bool(worst <= 3 and abs(z) <= 3))


def plots(results: dict, tag: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    runs = results["runs"]

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, ms in runs.items():
        ax.plot([m["step"] for m in ms], [m["reward"] for m in ms], marker="o", ms=3, label=mode,
                lw=2.5 if mode in ("ar", "adaptive") else 1.2)
    for i, ms in enumerate(results.get("noise_curves", {}).values()):
        ax.plot([m["step"] for m in ms], [m["reward"] for m in ms], color="grey", lw=0.8, alpha=0.7,
                label="ar, other rollout streams" if i == 0 else None)
    if "ar" in runs and results["overlay_vs_ar"]:
        r = np.array([m["reward"] for m in runs["ar"]])
        sig = np.array(next(iter(results["overlay_vs_ar"].values()))["sigma_per_step"])[: len(r)]
        ax.fill_between([m["step"] for m in runs["ar"]][: len(sig)], r[: len(sig)] - 3 * sig, r[: len(sig)] + 3 * sig,
                        color="C0", alpha=0.12, label="ar ± 3σ_k (run-to-run noise)")
    ax.set(xlabel="step", ylabel="mean reward", title=f"reward per step ({tag})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(RESULTS, f"paper_table_{tag}_reward.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, ms in runs.items():
        axes[0].plot([m["step"] for m in ms], [m["rollout_s"] for m in ms], marker="o", ms=3, label=mode)
        axes[1].plot([m["step"] for m in ms], [m["step_s"] for m in ms], marker="o", ms=3, label=mode)
    axes[0].set(xlabel="step", ylabel="seconds", title="rollout time per step")
    axes[1].set(xlabel="step", ylabel="seconds", title="end-to-end time per step")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(RESULTS, f"paper_table_{tag}_rollout.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, ms in runs.items():
        if mode == "ar":
            continue
        st = [m["step"] for m in ms]
        axes[0].plot(st, [m["tau"] if m["tau"] is not None else np.nan for m in ms], marker="o", ms=3, label=mode)
        axes[1].plot(st, [m["gamma_mean"] if m["sd_steps"] else np.nan for m in ms], marker="o", ms=3, label=mode)
        axes[2].plot(st, [m["sd_on_fraction"] for m in ms], marker="o", ms=3, label=mode)
    for ax, t in zip(axes, ("τ (tokens per SD step; gaps: no SD)", "mean γ of SD steps", "SD-on fraction of engine steps")):
        ax.set(xlabel="step", title=t)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(RESULTS, f"paper_table_{tag}_tau_gamma.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def median_line(results: dict) -> str:
    """Rollout s/step as medians over the steps, each run against ar's: one slow step (a shared machine's
    hiccup) moves a mean of few steps; the extra ar runs (same work, other streams) show ar against itself."""
    med = lambda run: float(np.median([m["rollout_s"] for m in run]))
    ar = med(results["runs"]["ar"])
    runs = {**results["runs"], **results.get("noise_curves", {})}
    parts = [f"{name} {med(run):.2f} s ({100 * (1 - med(run) / ar):+.1f}%)" for name, run in runs.items()]
    return ("Rollout s/step, medians over the steps (vs ar's median): " + ", ".join(parts) + ". The ar~i runs "
            "do ar's work on other rollout streams: their spread is ar's against itself.")


def markdown(results: dict, tag: str) -> str:
    c, s = results["config"], results["summary"]
    fmt = lambda x, f="{:.2f}": "–" if x is None else f.format(x)
    pct = lambda x: "–" if x is None else f"{100 * x:+.1f}%"
    lines = [f"# Paper table ({tag}): GRPO on {c['model']} / {c['task']}", "",
             f"{c['prompts_per_step']} prompts x {c['samples']} samples per step, up to {c['max_new_tokens']} new "
             f"tokens, T = {c['temperature']}, {c['steps']} steps, seed {c['seed']}, lr {c['lr']}, drafter "
             f"{c['drafter']}, fixed γ = {c['draft_length']} for sd/toggle; modes run "
             f"{'in lockstep' if c['interleave'] else 'one after another' + (' (in reverse order, ar last)' if c.get('reverse') else '')}. Machine: "
             f"{results['machine']['device']} ({results['machine']['cpu_count']} cores, jax "
             f"{results['machine']['jax']}), load average {fmt(results.get('loadavg_start'), '{:.1f}')} → "
             f"{fmt(results.get('loadavg_end'), '{:.1f}')}.", "",
             "| mode | rollout s/step | end-to-end s/step | rollout vs ar | end-to-end vs ar | mean τ | mean γ | "
             "SD-on fraction | drafter derivation s | final reward | mean reward |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in s.items():
        lines.append(f"| {mode} | {fmt(r['rollout_s_per_step'])} | {fmt(r['e2e_s_per_step'])} | "
                     f"{pct(r.get('rollout_reduction_vs_ar'))} | {pct(r.get('e2e_reduction_vs_ar'))} | "
                     f"{fmt(r['tau_mean'])} | {fmt(r['gamma_mean'])} | {fmt(r['sd_on_fraction'])} | "
                     f"{fmt(r['drafter_derive_s'], '{:.3f}')} | {fmt(r['final_reward'], '{:.3f}')} | "
                     f"{fmt(r['reward_mean'], '{:.3f}')} |")
    lines += ["", "Reduction = 1 − mode / ar (positive: faster than ar). Final reward: mean over the last "
              f"{next(iter(s.values()))['final_reward_steps']} step(s). Compile time (warm-up, not in the "
              "per-step numbers): " + ", ".join(f"{m} {r['rollout_compile_s'] + r['train_compile_s']:.0f} s"
                                  for m, r in s.items()) + ".",
              "", median_line(results),
              "", "## Reward overlay vs ar", "",
              "| run | mean reward − ar | z (mean reward) | max_k |d_k| / σ_k | identical samples | overlaid within noise |",
              "|---|---|---|---|---|---|"]
    for group in ("overlay_vs_ar", "overlay_noise_runs"):
        for mode, o in results[group].items():
            name = mode if group == "overlay_vs_ar" else f"{mode} (ar, other rollout streams: calibration)"
            lines.append(f"| {name} | {o['mean_reward_diff']:+.3f} | {o['mean_reward_z']:+.2f} | "
                         f"{o['max_abs_diff_over_sigma']:.2f} | {o['identical']} | {o['overlaid']} |")
    n_ar = 1 + c.get("noise_seeds", 0)
    lines += ["", f"How judged: d_k = reward_run − reward_ar at step k. The noise of a reward curve is estimated "
              f"from {n_ar} ar runs that share the initial weights and prompts and differ only in their rollout "
              "streams (ar and ar~i): σ_k = sqrt(2)·(std over those runs at step k), floored at the two-sample "
              f"binomial std sqrt(2 p̄(1 − p̄)/n), n = {c['prompts_per_step'] * c['samples']} rows. A run overlays ar "
              "when every |d_k| ≤ 3σ_k and its mean reward over all steps is within 3 standard deviations of ar's "
              "(the std of the ar runs' mean rewards, same floor). The ar~i rows apply the same test to ar itself "
              "with other streams: they show what the criterion does when the null hypothesis holds. A mode whose "
              "controller never speculated draws the very same samples as ar (identical).", "",
              f"Plots: paper_table_{tag}_reward.png, paper_table_{tag}_rollout.png, paper_table_{tag}_tau_gamma.png."]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts-per-step", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--model")
    p.add_argument("--task", choices=("arithmetic", "tiny"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-length", type=int, default=5)
    p.add_argument("--drafter", choices=("int4", "int8"), help="default: the preset's")
    p.add_argument("--calibration", default=None, help="controller constants (JSON) for toggle/adaptive/auto")
    p.add_argument("--max-operand", type=int, help="arithmetic: operands in [1, this]")
    p.add_argument("--layout", choices=("stacked", "unstacked"), help="SpecRollout execution layout")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA compilation cache directory shared by the modes (default: er_jax.xla_cache's; "
                        "'off' to disable)")
    p.add_argument("--force-speculation", action="store_true",
                   help="memory-bound controller constants: toggle/adaptive/auto always find SD worth it")
    p.add_argument("--noise-seeds", type=int,
                   help="extra ar runs with other rollout streams (same weights, prompts): run-to-run reward noise")
    p.add_argument("--sequential", action="store_true", help="run modes one after another (less memory)")
    p.add_argument("--reverse", action="store_true",
                   help="with --sequential: run them in reverse order (ar last), so a drift of the machine's speed "
                        "over the run favours ar instead of the modes after it")
    p.add_argument("--tag", help="result name suffix (default: the scale)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.scale].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    tag = args.tag or args.scale
    if args.force_speculation:
        args.calibration = dict(FORCED)
    # modes share most executables (prefill, AR, SD at γ = 5): compile each once
    args.compile_cache = xla_cache.enable(args.compile_cache)
    modes = list(dict.fromkeys(["ar"] + args.modes))  # ar is the reference of every comparison
    specs = run_specs(args, modes)

    t_start = time.perf_counter()
    la0 = loadavg()
    warm, runs = {}, {name: [] for name, _, _ in specs}
    report = lambda name, m: print(f"step {m['step']} {name}: rollout {m['rollout_s']:.1f} s, train {m['train_s']:.1f} s, "
                                   f"reward {m['reward']:.3f}, τ {m['tau']}, SD-on {m['sd_on_fraction']:.2f}",
                                   flush=True)
    # Lockstep groups: the timed modes together, then the extra ar runs (only their rewards matter; running them
    # separately keeps memory to five trainers). --sequential: every run on its own.
    # Between its steps a trainer waits offloaded to disk (weights + AdamW state), so memory holds one at a time.
    if args.reverse and not args.sequential:
        raise SystemExit("--reverse needs --sequential (lockstep rounds already rotate their order)")
    groups = ([[sp] for sp in (specs[::-1] if args.reverse else specs)] if args.sequential
              else [specs[:len(modes)], specs[len(modes):]])
    park = tempfile.mkdtemp(prefix="er_jax_paper_table_")
    for group in filter(None, groups):
        _, trainers = make_trainers(args, group)
        for name, tr in trainers.items():
            warm[name] = tr.warmup()
            print(f"{name}: compiled in {sum(warm[name].values()):.0f} s", flush=True)
            if len(trainers) > 1:
                tr.offload(os.path.join(park, name))
                gc.collect()
        names = list(trainers)
        for k in range(args.steps):
            for name in names[k % len(names):] + names[:k % len(names)]:  # the order rotates every round
                tr = trainers[name]
                if len(trainers) > 1:
                    tr.reload()
                runs[name].append(tr.step())
                report(name, runs[name][-1])
                if len(trainers) > 1:
                    tr.offload(os.path.join(park, name))
                    gc.collect()
        del trainers
        gc.collect()
    shutil.rmtree(park, ignore_errors=True)

    summary = {name: summarize(ms, warm[name]) for name, ms in runs.items()}
    ar = summary["ar"]
    for mode, s in summary.items():
        s["rollout_reduction_vs_ar"] = 1 - s["rollout_s_per_step"] / ar["rollout_s_per_step"]
        s["e2e_reduction_vs_ar"] = 1 - s["e2e_s_per_step"] / ar["e2e_s_per_step"]
    rows = args.prompts_per_step * args.samples
    noise = [name for name, _, _ in specs if name not in modes]
    refs = [runs["ar"]] + [runs[n] for n in noise]
    results = dict(
        machine=machine(), scale=args.scale,
        config=dict(model=args.model, task=args.task, prompts_per_step=args.prompts_per_step, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, steps=args.steps, lr=args.lr, temperature=args.temperature,
                    seed=args.seed, draft_length=args.draft_length, drafter=args.drafter, dtype=args.dtype,
                    modes=modes, interleave=not args.sequential, reverse=args.reverse, layout=args.layout, max_operand=args.max_operand,
                    calibration=calibration_record(args.calibration),
                    compile_cache=bool(args.compile_cache), noise_seeds=args.noise_seeds),
        summary={m: summary[m] for m in modes}, noise_runs={n: summary[n] for n in noise},
        overlay_vs_ar={m: overlay(refs, runs[m], rows) for m in modes if m != "ar"},
        # Calibration of the criterion: each extra ar run against seed-0 ar (the others supplying the noise).
        overlay_noise_runs={n: overlay([runs["ar"]] + [runs[x] for x in noise if x != n], runs[n], rows)
                            for n in noise},
        runs={m: runs[m] for m in modes}, noise_curves={n: runs[n] for n in noise}, loadavg_start=la0, loadavg_end=loadavg(), total_s=time.perf_counter() - t_start,
        notes=args.note)
    path = write_json(f"paper_table_{tag}.json", results)
    with open(os.path.join(RESULTS, f"paper_table_{tag}.md"), "w") as f:
        f.write(markdown(results, tag))
    plots(results, tag)
    print(markdown(results, tag))
    print(f"wrote {path} ({results['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
