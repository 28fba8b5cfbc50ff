"""Every PNG er_jax writes: the SD on/off boundary of a calibration (`er-jax plot`), the per-mode rollout timeline
of `er-jax bench rollout`, and a GRPO run's reward / time / τ plots (`er-jax train`). matplotlib (Agg) is imported
only when a plot is drawn."""
from __future__ import annotations

import math
import os
import textwrap
from typing import Sequence

import numpy as np

from er_jax import controller
from er_jax.sweep import measured_speedups

def plot_boundary(hw, costs, path: str, *, gamma: int = 5, taus: Sequence[float] | None = None,
                  rows: Sequence[dict] | None = None, batch_max: int = 256, context_range=(128, 8192),
                  epsilon: float = 0.05, title: str | None = None) -> str:
    """PNG: the predicted SD on/off boundary (speedup = 1 + ε) over batch × context for several τ, the
    predicted speedup at the largest τ as background, and measured sweep points overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    taus = sorted(taus or [t for t in (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0) if t <= gamma + 1])
    if rows:  # keep every measured point inside the axes
        batch_max = max(batch_max, max(r["batch"] for r in rows))
        context_range = (min(context_range[0], min(r["context"] for r in rows) / 1.5),
                         max(context_range[1], max(r["context"] for r in rows) * 1.5))
    bs = np.logspace(0, math.log2(batch_max), 120, base=2)
    ss = np.logspace(math.log2(context_range[0]), math.log2(context_range[1]), 120, base=2)
    bb, ssg = np.meshgrid(bs, ss, indexing="ij")
    t_t, t_d, t_v = controller.component_times(hw, costs, bb, ssg, gamma)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    top = taus[-1] * t_t / (gamma * t_d + t_v)
    lg = np.log2(top)
    lim = max(float(np.abs(lg).max()), 0.1)
    mesh = ax.pcolormesh(bs, ss, lg.T, cmap="RdYlGn", norm=TwoSlopeNorm(0.0, -lim, lim), shading="auto", alpha=0.7)
    cb = fig.colorbar(mesh, ax=ax)
    cb.set_label(f"log2 predicted speedup at τ={taus[-1]:g}")
    drawn = []
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(taus)))
    for tau, col in zip(taus, colors):
        sp = tau * t_t / (gamma * t_d + t_v)
        if sp.min() < 1 + epsilon <= sp.max():
            cs = ax.contour(bs, ss, sp.T, levels=[1 + epsilon], colors=[col], linewidths=1.8)
            ax.clabel(cs, fmt={1 + epsilon: f"τ={tau:g}"}, fontsize=8, inline=False)
            drawn.append(tau)
    if rows:
        pts = measured_speedups(rows, gamma) or measured_speedups(rows)
        for p in pts:
            on = p["speedup"] >= 1 + epsilon
            ax.scatter(p["batch"], p["context"], marker="o" if on else "x", s=60,
                       c="tab:green" if on else "tab:red", zorder=5)
            ax.annotate(f"{p['speedup']:.2f}", (p["batch"], p["context"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("active batch B")
    ax.set_ylabel("mean context S")
    never = [t for t in taus if t not in drawn]
    everywhere = "SD on" if top.min() >= 1 + epsilon else "SD off"  # top: the speedup at the largest τ
    note = "" if not never else (f"  (no boundary in range for τ={', '.join(f'{t:g}' for t in never)}: "
                                 f"{everywhere} everywhere at τ max)" if len(never) == len(taus) else
                                 f"  (no boundary for τ={', '.join(f'{t:g}' for t in never)})")
    ax.set_title((title or f"SD on/off boundary, γ={gamma}, {costs.name}, {hw.platform}") + "\n"
                 "lines: predicted speedup = 1+ε per τ; points: measured τ·T_ar/T_sd (o: ≥ 1+ε, x: below)"
                 + (f"\n{note.strip()}" if note else ""), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(result: dict, path: str) -> str:
    """PNG: active rows and chosen γ per step, one panel per mode (the last repeat of each)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in result["modes"] if result["modes"][m].get("timeline")]
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 1.9 * len(modes) + 0.6), sharex=True, squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        r = result["modes"][mode]
        tl = r["timeline"]
        steps = np.arange(len(tl["active"]))
        ax.fill_between(steps, tl["active"], step="post", color="tab:blue", alpha=0.3, label="active rows")
        ax.set_ylabel("active", color="tab:blue")
        ax2 = ax.twinx()
        ax2.step(steps, tl["gamma"], where="post", color="tab:red", lw=1.2, label="γ")
        ax2.set_ylabel("γ", color="tab:red")
        ax2.set_ylim(-0.5, max(max(tl["gamma"], default=0), 1) + 1)
        ratio = r.get("ratio_vs_ar")
        ax.set_title(f"{mode}: {r['wall_min']:.2f} s fastest, {r['wall_s']:.2f} s median of {len(r['walls'])}"
                     + (f", x{ratio:.3f} of ar" if ratio else "") + f", SD-on {r['sd_on_fraction']:.0%}"
                     + (f", τ {r['tau']:.2f}" if r.get("tau") else ""), fontsize=9)
    axes[-1, 0].set_xlabel("engine step")
    fig.suptitle(textwrap.fill(f"rollout timeline: {result['workload']['description']}", 110), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(metrics: list[dict], out_dir: str, label: str = "") -> list[str]:
    """reward.png, rollout_time.png, tau_gamma.png in out_dir. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return []
    steps = [m["step"] for m in metrics]
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [m["reward"] for m in metrics], marker="o", ms=3)
    ax.set(xlabel="step", ylabel="mean reward", title=f"reward {label}".strip())
    ax.grid(alpha=0.3)
    save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [m["rollout_s"] for m in metrics], marker="o", ms=3, label="rollout")
    ax.plot(steps, [m["train_s"] for m in metrics], marker="s", ms=3, label="train (incl. drafter derivation)")
    ax.set(xlabel="step", ylabel="seconds", title=f"time per step {label}".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "rollout_time.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tau = [m["tau"] if m["tau"] is not None else float("nan") for m in metrics]
    ax.plot(steps, tau, marker="o", ms=3, color="C0", label="τ (tokens / SD step)")
    ax.plot(steps, [m["gamma_mean"] if m["sd_steps"] else float("nan") for m in metrics], marker="s", ms=3,
            color="C1", label="mean γ of SD steps")
    ax.set(xlabel="step", ylabel="tokens", title=f"τ and γ {label}".strip())
    ax2 = ax.twinx()
    ax2.plot(steps, [m["sd_on_fraction"] for m in metrics], ls="--", color="C2", label="SD-on fraction")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("SD-on fraction")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "tau_gamma.png")
    return paths
