"""Drafter variants' acceptance without speculating: for a drafter q of the target p, speculative sampling at
T = 1 accepts a draft at a position with probability sum_v min(p_v, q_v) (= 1 - total variation). So the mean of
that over positions the target itself sampled estimates the per-token acceptance α of the drafter, from two
teacher-forced forwards and no rollout: quick enough to screen formats before building kernels for them.

Sequences: the first --prompts chat prompts of experiments/acceptance.py, --new-tokens tokens each sampled from the
target (SmolLM2, f32, T = 1, seeds --seeds). Variants, run through the XLA backend's plain-jnp ops:
  - the drafters as shipped: int8 / int4 projections, head "shared" (the target's) or "int8";
  - an int4 head (quantize_int4 of the [576, V] head, groups of 128 along D): not offered, measured here;
  - other activation formats for every quantized matmul, as a fake quantization in f32 (x -> round(x / s) s),
    replacing the shipped bf16 rounding: int8 symmetric per row ("a8_row") or per group of 64 / 32 along K
    ("a8_g64", "a8_g32"), int16 per row ("a16i_row"); the shape a VNNI kernel (vpdpbusd / vpdpwssd) would take.
Writes experiments/results/<--out>.

    python experiments/acceptance_tf.py [--prompts 16] [--new-tokens 96] [--seeds 1 2]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import PROMPTS  # noqa: E402
from common import machine, write_json, xla_cache  # noqa: E402

# name -> (levels (2^(bits-1) - 1), group along K; 0 = the whole row)
ACTIVATIONS = {"a8_row": (127, 0), "a8_g64": (127, 64), "a8_g32": (127, 32), "a16i_row": (32767, 0)}
VARIANTS = [("int8", "shared", "bf16"), ("int8", "int8", "bf16"), ("int8", "int4", "bf16"),
            *[("int8", "int8", a) for a in ACTIVATIONS],
            ("int4", "shared", "bf16"), ("int4", "int8", "bf16"), ("int4", "int4", "bf16"),
            ("int4", "int8", "a8_row"), ("int4", "int8", "a8_g64")]


def fake_quant(x, levels: int, group: int):
    """x rounded to a symmetric integer grid of `levels` steps each side per row (or per `group` along the last
    axis), in f32."""
    xf = x.astype(jnp.float32)
    g = group or xf.shape[-1]
    xg = xf.reshape(*xf.shape[:-1], xf.shape[-1] // g, g)
    amax = jnp.max(jnp.abs(xg), -1, keepdims=True)
    q = jnp.clip(jnp.round(xg * jnp.where(amax > 0, levels / amax, 0.0)), -levels, levels)
    return (q * (amax / levels)).reshape(xf.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="acceptance_tf.json")
    args = ap.parse_args()
    xla_cache.enable()
    import er_jax
    from er_jax import model
    from er_jax.kernels import xla
    from er_jax.quant import dequantize, derive_drafter, drafter_head_matrix, quantize_int4

    m = er_jax.load_model("smollm2")
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    n = len(ids)
    r = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=n, max_prompt_len=max(map(len, ids)),
                           max_new_tokens=args.new_tokens, mode="ar", kernels="xla")
    shipped = xla.IMPLS["quant_matmul"]

    def with_activations(act):  # the XLA backend's quantized matmul with another activation format
        if act == "bf16":
            return shipped
        levels, group = ACTIVATIONS[act]

        def qm(x, qa, *, ex, name=None):
            w = dequantize(qa, jnp.float32)
            return jnp.einsum("...k,kn->...n", fake_quant(x, levels, group), w,
                              preferred_element_type=jnp.float32).astype(x.dtype)
        return qm

    res = {"benchmark": "acceptance_tf", "machine": machine(), "model": "smollm2 (GGUF dequantized to f32)",
           "setup": dict(prompts=n, new_tokens=args.new_tokens, seeds=args.seeds, temperature=1.0, kernels="xla"),
           "alpha": {}}
    for seed in args.seeds:
        out = r.generate(ids, er_jax.RolloutConfig(temperature=1.0, seed=seed), min_new_tokens=[args.new_tokens] * n)
        seqs = [list(p) + list(c) for p, c in zip(ids, out.tokens)]
        toks = np.zeros((n, max(map(len, seqs))), np.int32)
        mask = np.zeros(toks.shape, bool)  # the positions whose next token the target sampled
        for i, (p, s) in enumerate(zip(ids, seqs)):
            toks[i, : len(s)] = s
            mask[i, len(p) - 1: len(s) - 1] = True
        fwd = jax.jit(lambda w, t: model.forward(m.config, w, t))  # traced anew per variant (the op is swapped)
        p_t = jax.nn.softmax(fwd(m.weights, jnp.asarray(toks)), -1)
        for scheme, head, act in VARIANTS:
            d = derive_drafter(m.weights, scheme, head="int8" if head == "int4" else head)
            if head == "int4":
                d["lm_head_q"] = quantize_int4(drafter_head_matrix(m.weights), 128)
            xla.IMPLS["quant_matmul"] = with_activations(act)
            try:
                fwd = jax.jit(lambda w, t: model.forward(m.config, w, t))
                p_d = jax.nn.softmax(fwd(d, jnp.asarray(toks)), -1)
            finally:
                xla.IMPLS["quant_matmul"] = shipped
            alpha = float(np.asarray(jnp.minimum(p_t, p_d).sum(-1))[mask].mean())
            res["alpha"].setdefault(f"{scheme}_{head}head_{act}", []).append(alpha)
            print(f"seed {seed} {scheme} head={head:6s} activations={act:8s} α ≈ {alpha:.4f}", flush=True)
        write_json(args.out, res)
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
