"""How the SD-on threshold moves with tensor parallelism, in the cost model's view (the paper only covered
TP = 1). Pure arithmetic, no device needed:

    python experiments/tp_threshold.py [--preset qwen2.5-7b] [--context 2048] [--gamma 7] [--alpha 0.97]

With TP = t each device reads W/t weight bytes and does 1/t of the FLOPs, so the memory-bound and the
compute-bound terms shrink together and, alone, would leave the crossover batch unchanged. What does not
shrink is the all-reduce after each row-parallel matmul (2 per layer, every forward): a latency paid by
each of the γ draft forwards and by the verify, plus bytes that grow with B·T. Writes
experiments/results/tp_threshold.json and prints the largest batch at which SD still pays.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402

from er_jax.config import SHAPE_PRESETS  # noqa: E402
from er_jax.controller import ModelCosts, component_times, defaults_for, expected_tau  # noqa: E402


def sd_speedup(costs, hw, config, tp, batch, context, gamma, tau, link_bw, link_lat):
    t_t, t_d, t_v = component_times(hw, costs, batch, context, gamma)
    # Per-device work shrinks by tp (weights, KV heads and FLOPs are all split); overheads do not.
    scale = lambda t, o: (t - o) / tp + o
    t_t, t_d, t_v = scale(t_t, hw.o_t), scale(t_d, hw.o_d), scale(t_v, hw.o_v)
    if tp > 1:  # ring all-reduce of [B, T, D] activations, twice per layer per forward
        per_token = 2 * (tp - 1) / tp * config.hidden_size * 2 / link_bw
        ar = lambda tokens: 2 * config.num_layers * (link_lat + tokens * per_token)
        t_t, t_d, t_v = t_t + ar(batch), t_d + ar(batch), t_v + ar(batch * (gamma + 1))
    return tau * t_t / (gamma * t_d + t_v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-7b", choices=sorted(SHAPE_PRESETS))
    ap.add_argument("--context", type=float, default=2048)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--alpha", type=float, default=0.97, help="per-token acceptance (paper: 0.958-0.982)")
    ap.add_argument("--link-gbps", type=float, default=450.0, help="all-reduce bus bandwidth per GPU, GB/s")
    ap.add_argument("--link-latency-us", type=float, default=8.0, help="latency of one small all-reduce")
    args = ap.parse_args()

    config = SHAPE_PRESETS[args.preset].replace(dtype="bfloat16")
    costs = ModelCosts.from_config(config, "int4")
    hw = defaults_for("gpu")
    tau = expected_tau(args.alpha, args.gamma)
    rows = []
    for tp in (1, 2, 4, 8):
        on = [b for b in range(1, 513) if sd_speedup(costs, hw, config, tp, b, args.context, args.gamma, tau,
                                                     args.link_gbps * 1e9, args.link_latency_us * 1e-6) >= 1.05]
        s1 = sd_speedup(costs, hw, config, tp, 1, args.context, args.gamma, tau, args.link_gbps * 1e9,
                        args.link_latency_us * 1e-6)
        rows.append({"tp": tp, "max_batch_sd_on": max(on) if on else 0, "speedup_at_b1": s1})
        print(f"TP={tp}: SD pays up to B={rows[-1]['max_batch_sd_on']:3d} active rows; predicted speedup at B=1 "
              f"{s1:.2f}x")
    print("wrote", write_json("tp_threshold.json", {"preset": args.preset, "context": args.context,
                                                     "gamma": args.gamma, "alpha": args.alpha, "tau": tau,
                                                     "hardware": hw.to_dict(), "link_GBps": args.link_gbps,
                                                     "link_latency_us": args.link_latency_us, "rows": rows}))


if __name__ == "__main__":
    main()
