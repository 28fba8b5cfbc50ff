"""Pallas kernels vs XLA: quantized matmul (W4A16 / W8A16), fused rejection sampling, ragged attention.

    python experiments/bench_kernels.py            # full sizes on GPU; --tiny by default on CPU
    python experiments/bench_kernels.py --tiny     # tiny shapes, interpret mode: a correctness smoke run
    python experiments/bench_kernels.py --preflight [--tiny]  # every kernel vs its reference, Qwen2.5-1.5B shapes
    python experiments/bench_kernels.py --quick    # the timing tables at Qwen2.5-1.5B shapes only (short)

Pre-flight: each Pallas kernel (int4 / int8 matmul plain and stacked with `layer=`, attention at T = 1 / 8
and a 512-token prefill (query-row tiles), rejection greedy / T = 1 / top-k-top-p) against its reference on
the device at Qwen2.5-1.5B shapes; prints the errors and writes preflight_<device>.json with `ok` per check.

Matmul: decode shapes (q, k/v, o, gate/up, down) of Qwen2.5-1.5B / 7B and Llama-3.1-8B at M in
{1, 8, 16, 32, 64}; each variant runs inside a lax.scan over L stacked copies of the weight, as in the
model (L large enough that the weights do not stay in L2), time per layer. GB/s = (weight + activation
+ output bytes) / time, next to the measured device-to-device copy bandwidth. Variants: Pallas int4 /
int8 reading layer i in place (`layer=i`), Pallas int4 fed the scan's slice (includes any copy XLA makes
to hand a slice to a custom call), XLA dot(x, dequantize(W)) int4 / int8, bf16 dense dot.
Rejection: the fused kernel vs the jnp reference (both jitted) at V = 151936, γ in {3, 7, 11},
B in {1, 16, 64}, temperature 1; GB/s counts one read of the target and drafter logits.
Attention: the kernel vs XLA (er_jax.model.attention_reference) in a scan over 4 layers of a stacked
cache of 8192 positions whose rows hold 1k..8k tokens, T = 1 (decode) and T = 8 (verify γ = 7), per
layer; kernel reading the layer in place and fed the slice k[i]; GB/s counts the K/V a row needs.
Every kernel result is also checked against its reference (max error / agreement in the JSON).
Writes experiments/results/bench_kernels_<device>.json (cpu-interpret for --tiny on CPU) and prints tables.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, machine, machine_tag, timeit, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from er_jax.config import SHAPE_PRESETS, ModelConfig, SamplingConfig, platform  # noqa: E402
from er_jax.kernels.attention import attention_reference, ragged_attention  # noqa: E402
from er_jax.kernels.quant_matmul import quant_matmul, quant_matmul_reference  # noqa: E402
from er_jax.kernels.rejection import rejection_sample, rejection_sample_reference  # noqa: E402
from er_jax.kernels.quant_matmul import dequant_matmul  # noqa: E402
from er_jax.quant import quantize_int4, quantize_int8  # noqa: E402

MODELS = ("qwen2.5-1.5b", "qwen2.5-7b", "llama3.1-8b")
TINY = ModelConfig(vocab_size=300, hidden_size=160, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, name="tiny")
SCAN_BYTES = 256 << 20  # weight bytes streamed per timed call (beyond L2)


def projection_shapes(cfg: ModelConfig):
    d, f = cfg.hidden_size, cfg.intermediate_size
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": (d, qd), "k/v": (d, kvd), "o": (qd, d), "gate/up": (d, f), "down": (f, d)}


def _stack(a, n):
    return jnp.broadcast_to(a, (n, *a.shape)) + 0  # n distinct buffers' worth of bytes


def _scan_fn(apply):
    """jit(x, stacked weights) -> sum over layers of apply(x, w_layer): the model's scan over layers,
    where XLA slices each layer out of the stack."""
    def run(x, ws):
        def body(acc, w):
            return acc + apply(x, w).astype(jnp.float32), None
        acc, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], _n_out(ws)), jnp.float32), ws)
        return acc
    return jax.jit(run)


def _scan_inplace_fn(interpret):
    """As _scan_fn, but the kernel reads layer i of the stack in place (quant_matmul(..., layer=i))."""
    def run(x, ws):
        def body(acc, i):
            return acc + quant_matmul(x, ws, layer=i, interpret=interpret).astype(jnp.float32), None
        acc, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], _n_out(ws)), jnp.float32),
                              jnp.arange(ws.data.shape[0]))
        return acc
    return jax.jit(run)


def _n_out(ws):
    return (ws.data if hasattr(ws, "data") else ws).shape[-1]


def bench_matmul(models, ms, interpret, reps, max_layers):
    rows = []
    for name, cfg in models:
        for proj, (k, n) in projection_shapes(cfg).items():
            w = (0.02 * jax.random.normal(jax.random.key(0), (k, n))).astype(jnp.bfloat16)
            qa = {"int4": quantize_int4(w), "int8": quantize_int8(w)}
            layers = int(np.clip(-(-SCAN_BYTES // qa["int4"].nbytes), 2, max_layers))
            stacked = {s: jax.tree_util.tree_map(lambda a: _stack(a, layers), q) for s, q in qa.items()}
            dense = _stack(w, layers)
            variants = {
                "pallas_int4": (_scan_inplace_fn(interpret), stacked["int4"]),
                "pallas_int8": (_scan_inplace_fn(interpret), stacked["int8"]),
                "pallas_sliced_int4": (_scan_fn(functools.partial(quant_matmul, interpret=interpret)), stacked["int4"]),
                "xla_int4": (_scan_fn(dequant_matmul), stacked["int4"]),
                "xla_int8": (_scan_fn(dequant_matmul), stacked["int8"]),
                "dense_bf16": (_scan_fn(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)), dense),
            }
            for m in ms:
                x = jax.random.normal(jax.random.key(1), (m, k)).astype(jnp.bfloat16)
                row = {"model": name, "proj": proj, "K": k, "N": n, "M": m, "layers": layers}
                for scheme in ("int4", "int8"):  # correctness of the kernel on this shape
                    y = quant_matmul(x, qa[scheme], interpret=interpret).astype(jnp.float32)
                    ref = quant_matmul_reference(x, qa[scheme]).astype(jnp.float32)
                    row[f"pallas_{scheme}_max_rel_err"] = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
                io = 2 * m * (k + n)
                for v, (fn, ws) in variants.items():
                    t = timeit(lambda: fn(x, ws).block_until_ready(), warmup=1, reps=reps) / layers
                    wbytes = qa[v[-4:]].nbytes if v != "dense_bf16" else w.size * 2
                    row[f"{v}_us"] = 1e6 * t
                    row[f"{v}_GBps"] = (wbytes + io) / t / 1e9
                rows.append(row)
                print(f"{name:13s} {proj:8s} M={m:3d} K={k:6d} N={n:6d} | GB/s  pallas int4 "
                      f"{row['pallas_int4_GBps']:8.1f}  int8 {row['pallas_int8_GBps']:8.1f}  sliced int4 "
                      f"{row['pallas_sliced_int4_GBps']:8.1f} | xla int4 "
                      f"{row['xla_int4_GBps']:8.1f}  int8 {row['xla_int8_GBps']:8.1f} | bf16 "
                      f"{row['dense_bf16_GBps']:8.1f}"
                      f" | err {row['pallas_int4_max_rel_err']:.1e}", flush=True)
    return rows


def bench_rejection(vocab, gammas, batches, interpret, reps):
    rows = []
    sc = SamplingConfig(1.0)
    kernel = jax.jit(functools.partial(rejection_sample, sc=sc, interpret=interpret))
    ref = jax.jit(functools.partial(rejection_sample_reference, sc=sc))
    for gamma in gammas:
        for b in batches:
            ks = jax.random.split(jax.random.key(gamma * 1000 + b), 4)
            t = 3 * jax.random.normal(ks[0], (b, gamma + 1, vocab))
            d = t[:, :gamma] + 0.3 * jax.random.normal(ks[1], (b, gamma, vocab))
            tok = jax.random.categorical(ks[2], d, axis=-1).astype(jnp.int32)
            keys = jax.random.split(ks[3], b)
            args = (t, d, tok)
            out_k, out_r = kernel(*args, keys=keys), ref(*args, keys=keys)
            t_k = timeit(lambda: jax.block_until_ready(kernel(*args, keys=keys)), warmup=1, reps=reps)
            t_r = timeit(lambda: jax.block_until_ready(ref(*args, keys=keys)), warmup=1, reps=reps)
            nbytes = 4 * b * (2 * gamma + 1) * vocab
            row = {"V": vocab, "gamma": gamma, "B": b, "kernel_us": 1e6 * t_k, "reference_us": 1e6 * t_r,
                   "speedup": t_r / t_k, "kernel_GBps": nbytes / t_k / 1e9,
                   "same_n": float(jnp.mean(out_k[0] == out_r[0])),
                   "same_tokens": float(jnp.mean(out_k[1] == out_r[1])),
                   "mean_accepted": float(jnp.mean(out_k[0]))}
            rows.append(row)
            print(f"rejection V={vocab} γ={gamma:2d} B={b:3d} | kernel {row['kernel_us']:9.1f} us "
                  f"({row['kernel_GBps']:7.1f} GB/s)  reference {row['reference_us']:9.1f} us  "
                  f"x{row['speedup']:.2f} | same tokens {row['same_tokens']:.3f}", flush=True)
    return rows


def bench_attention(models, max_len, contexts, batches, ts, n_layers, interpret, reps):
    """Per-layer time of a scan over `n_layers` layers of a stacked [L, B, S, KV, hd] cache, as in the
    model: the kernel reading layer i in place, the kernel fed the slice k[i] (what XLA must copy to
    call a custom kernel), and XLA's attention_reference on k[i]."""
    rows = []

    def scan(attend):
        def run(q, k, v, q_pos):
            def body(acc, i):
                return acc + attend(q, k, v, q_pos, i).astype(jnp.float32), None
            return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_layers))[0]
        return jax.jit(run)

    variants = {
        "pallas": scan(lambda q, k, v, p, i: ragged_attention(q, k, v, p, layer=i, interpret=interpret)),
        "pallas_sliced": scan(lambda q, k, v, p, i: ragged_attention(q, k[i], v[i], p, interpret=interpret)),
        "xla": scan(lambda q, k, v, p, i: attention_reference(q, k[i], v[i], p)),
    }
    for name, cfg in models:
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        for b in batches:
            ks = jax.random.split(jax.random.key(b), 3)
            k = jax.random.normal(ks[0], (n_layers, b, max_len, kv, hd), jnp.bfloat16)
            v = jax.random.normal(ks[1], (n_layers, b, max_len, kv, hd), jnp.bfloat16)
            for t in ts:
                q = jax.random.normal(ks[2], (b, t, h, hd), jnp.bfloat16)
                for ctx in contexts:
                    q_pos = jnp.full((b, 1), ctx - t, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
                    got = ragged_attention(q, k[0], v[0], q_pos, interpret=interpret).astype(jnp.float32)
                    err = float(jnp.max(jnp.abs(got - attention_reference(q, k[0], v[0], q_pos).astype(jnp.float32))))
                    row = {"model": name, "B": b, "T": t, "context": ctx, "max_len": max_len,
                           "layers": n_layers, "max_abs_err": err}
                    for vname, fn in variants.items():
                        sec = timeit(lambda: fn(q, k, v, q_pos).block_until_ready(), warmup=1, reps=reps) / n_layers
                        row[f"{vname}_us"] = 1e6 * sec
                    row["speedup_vs_xla"] = row["xla_us"] / row["pallas_us"]
                    row["pallas_GBps"] = 2 * b * ctx * kv * hd * 2 / (row["pallas_us"] * 1e-6) / 1e9
                    rows.append(row)
                    print(f"attention {name:13s} B={b:3d} T={t:2d} ctx={ctx:5d}/{max_len} | pallas "
                          f"{row['pallas_us']:9.1f} us ({row['pallas_GBps']:7.1f} GB/s)  sliced "
                          f"{row['pallas_sliced_us']:9.1f} us  xla {row['xla_us']:9.1f} us  "
                          f"x{row['speedup_vs_xla']:.2f}"
                          f" | err {err:.1e}", flush=True)
    return rows


def preflight(cfg: ModelConfig, interpret: bool, batch: int, context: int, prompt: int, vocab: int, gamma: int):
    """Every kernel vs its reference at `cfg`'s shapes (bf16 activations). Returns result rows."""
    rows = []

    def record(kernel, shape, err, tol, **extra):
        row = {"kernel": kernel, "shape": shape, "err": float(err), "tol": tol, "ok": bool(err <= tol), **extra}
        rows.append(row)
        print(f"preflight {kernel:28s} {shape:40s} err {row['err']:.3e} (tol {tol:g}) "
              f"{'ok' if row['ok'] else 'FAIL'}", flush=True)

    key = iter(jax.random.split(jax.random.key(0), 64))
    d, f = cfg.hidden_size, cfg.intermediate_size
    rel = lambda a, b: jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)
    for k_in, n_out in ((d, f), (f, d)):
        w = 0.02 * jax.random.normal(next(key), (k_in, n_out), jnp.float32)
        for m in (1, batch):
            x = jax.random.normal(next(key), (m, k_in), jnp.bfloat16)
            for scheme, quantize in (("int4", quantize_int4), ("int8", quantize_int8)):
                qa = quantize(w)
                ref = quant_matmul_reference(x, qa).astype(jnp.float32)
                got = quant_matmul(x, qa, interpret=interpret).astype(jnp.float32)
                record(f"quant_matmul_{scheme}", f"M={m} K={k_in} N={n_out}", rel(got, ref), 2e-2)
                stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), qa)
                got = jax.jit(lambda x, s: quant_matmul(x, s, layer=jnp.int32(2), interpret=interpret))(x, stacked)
                record(f"quant_matmul_{scheme}[layer=2]", f"M={m} K={k_in} N={n_out}",
                       rel(got.astype(jnp.float32), ref), 2e-2)
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s_len = context + prompt
    k = jax.random.normal(next(key), (2, batch, s_len, kv, hd), jnp.bfloat16)
    v = jax.random.normal(next(key), (2, batch, s_len, kv, hd), jnp.bfloat16)
    lengths = jax.random.randint(next(key), (batch,), 1, context)
    for t in (1, gamma + 1, prompt):
        q = jax.random.normal(next(key), (batch, t, h, hd), jnp.bfloat16)
        q_pos = (lengths[:, None] if t < prompt else 0) + jnp.arange(t, dtype=jnp.int32)[None, :]
        q_pos = jnp.broadcast_to(q_pos, (batch, t)).astype(jnp.int32)
        ref = attention_reference(q, k[1], v[1], q_pos).astype(jnp.float32)
        got = jax.jit(lambda q, k, v, p: ragged_attention(q, k, v, p, layer=jnp.int32(1), interpret=interpret))(
            q, k, v, q_pos).astype(jnp.float32)
        record("ragged_attention[layer=1]", f"B={batch} T={t} S={s_len} H={h} KV={kv} hd={hd}",
               jnp.max(jnp.abs(got - ref)), 3e-2)
    for name, sc in (("greedy", SamplingConfig(0.0)), ("t1", SamplingConfig(1.0)),
                     ("topkp", SamplingConfig(1.0, top_k=50, top_p=0.9))):
        tl = 4 * jax.random.normal(next(key), (batch, gamma + 1, vocab), jnp.float32)
        dl = tl[:, :gamma] + jax.random.normal(next(key), (batch, gamma, vocab), jnp.float32)
        dt = jnp.argmax(dl, -1).astype(jnp.int32)
        keys = jax.random.split(next(key), batch)
        n_r, tok_r, lp_r = jax.jit(rejection_sample_reference, static_argnums=3)(tl, dl, dt, sc, keys)
        n_k, tok_k, lp_k = jax.jit(lambda *a: rejection_sample(*a[:3], sc, a[3], interpret=interpret))(tl, dl, dt, keys)
        same = float(jnp.mean((n_r == n_k) & jnp.all(tok_r == tok_k, axis=1)))
        lp_err = float(jnp.max(jnp.where(tok_r == tok_k, jnp.abs(lp_r - lp_k), 0.0)))
        record(f"rejection_{name}", f"B={batch} gamma={gamma} V={vocab}", 1.0 - same, 0.05, logprob_err=lp_err)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny shapes in interpret mode (default on CPU)")
    size.add_argument("--full", action="store_true", help="real model shapes (default on GPU)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["matmul", "rejection", "attention"])
    ap.add_argument("--preflight", action="store_true", help="only check every kernel against its reference")
    ap.add_argument("--quick", action="store_true", help="Qwen2.5-1.5B shapes only, a short grid")
    args = ap.parse_args()
    on_cpu = platform() == "cpu"
    tiny = args.tiny or (on_cpu and not args.full)
    interpret = on_cpu
    reps = args.reps or (2 if tiny else 10)
    t0 = time.perf_counter()
    tag = "cpu-interpret" if interpret else machine_tag()
    if args.preflight:
        cfg = TINY if tiny else SHAPE_PRESETS["qwen2.5-1.5b"]
        sizes = dict(batch=4, context=48, prompt=32, vocab=TINY.vocab_size, gamma=3) if tiny else dict(
            batch=64, context=2048, prompt=512, vocab=cfg.vocab_size, gamma=7)
        rows = preflight(cfg, interpret, **sizes)
        payload = {"benchmark": "preflight", "model": cfg.name, "interpret": interpret, "machine": machine(),
                   "config": sizes, "checks": rows, "all_ok": all(r["ok"] for r in rows),
                   "wall_s": time.perf_counter() - t0}
        print(f"preflight: {sum(r['ok'] for r in rows)} of {len(rows)} checks ok")
        print("wrote", write_json(f"preflight_{tag}.json", payload))
        return

    if tiny:
        models = [("tiny", TINY)]
        config = dict(ms=[5], max_layers=2, vocab=TINY.vocab_size, gammas=[3], batches=[1, 4],
                      max_len=64, contexts=[16, 48], att_batches=[3], ts=[1, 4], att_layers=2)
    else:
        models = [(m, SHAPE_PRESETS[m]) for m in MODELS]
        config = dict(ms=[1, 8, 16, 32, 64], max_layers=256, vocab=151936, gammas=[3, 7, 11],
                      batches=[1, 16, 64], max_len=8192, contexts=[1024, 2048, 4096, 8192],
                      att_batches=[1, 16, 64], ts=[1, 8], att_layers=4)
        if args.quick:
            models = models[:1]
            config.update(ms=[1, 64], gammas=[7], batches=[1, 64], contexts=[1024, 4096], att_batches=[1, 64])
    bw = copy_bandwidth(4 << 20 if tiny else 1 << 30)
    print(f"device-to-device copy bandwidth: {bw / 1e9:.1f} GB/s")
    results = {}
    if "matmul" not in args.skip:
        results["matmul"] = bench_matmul(models, config["ms"], interpret, reps, config["max_layers"])
    if "rejection" not in args.skip:
        results["rejection"] = bench_rejection(config["vocab"], config["gammas"], config["batches"], interpret, reps)
    if "attention" not in args.skip:
        results["attention"] = bench_attention(models, config["max_len"], config["contexts"],
                                               config["att_batches"], config["ts"], config["att_layers"],
                                               interpret, reps)
    payload = {"benchmark": "bench_kernels", "mode": "tiny" if tiny else ("quick" if args.quick else "full"),
               "interpret": interpret,
               "lowering": "interpret" if interpret else "Triton (er_jax.kernels.call, explicit CompilerParams)",
               "machine": machine(), "copy_bandwidth_GBps": bw / 1e9,
               "config": {**config, "models": [m for m, _ in models], "reps": reps, "dtype": "bfloat16",
                          "scan_bytes": SCAN_BYTES}, **results, "wall_s": time.perf_counter() - t0}
    if interpret:
        payload["note"] = "interpret mode: timings measure the Pallas interpreter on CPU, not a kernel"
    print("wrote", write_json(f"bench_kernels_{tag}.json", payload))


if __name__ == "__main__":
    main()
