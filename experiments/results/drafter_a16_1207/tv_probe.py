"""Paired acceptance probe: what the drafter's 16-bit activations cost (2026-12-07).

The target samples N chat prompts x T tokens at temperature 1 (mode "ar"); at every generated position both
drafters' next-token distributions q are compared with the target's p through α = E[1 - TV(p, q)] = E[Σ min(p, q)],
the exact acceptance probability of one draft (drafter teacher-forced on its own K/V, the XLA backend). Each drafter
(int8 / int4 projections, int8 head) runs twice on the same sequences: with 16-bit activations (as shipped:
`quantized_activations`) and with f32 ones (that function patched to the identity), so the difference is paired.

    python experiments/results/drafter_a16_1207/tv_probe.py 64 128 out.json
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import er_jax  # noqa: E402
import er_jax.kernels.quant_matmul as QM  # noqa: E402
import er_jax.model as M  # noqa: E402
from acceptance import PROMPTS  # noqa: E402
from common import machine  # noqa: E402
from er_jax.quant import derive_drafter  # noqa: E402

shipped = QM.quantized_activations
m = er_jax.load_model("smollm2", dtype="float32")
cfg = m.config
n_rows, new = int(sys.argv[1]), int(sys.argv[2])
ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in PROMPTS[:n_rows]]
rc = er_jax.RolloutConfig(temperature=1.0, top_p=1.0, top_k=None, seed=0, apply_chat_template=True)
r = er_jax.SpecRollout(cfg, m.weights, m.tokenizer, max_batch=n_rows, max_prompt_len=max(map(len, ids)),
                       max_new_tokens=new, mode="ar")
gen = r.generate(ids, rc, min_new_tokens=[new] * n_rows)
seqs = np.full((n_rows, max(map(len, ids)) + new), cfg.pad_id, np.int32)
for i, p in enumerate(ids):
    seqs[i, :len(p)] = p
    seqs[i, len(p):len(p) + new] = gen.tokens[i]
idx = np.array([len(p) for p in ids])[:, None] - 1 + np.arange(1, new)[None]  # logits predicting tokens 1 .. new-1


def overlap(w, dw, toks):
    lp, lq = jax.nn.log_softmax(M.forward(cfg, w, toks)), jax.nn.log_softmax(M.forward(cfg, dw, toks))
    return jnp.sum(jnp.exp(jnp.minimum(lp, lq)), -1)


res = {}
for scheme in ("int8", "int4"):
    dw = derive_drafter(m.weights, scheme, 128, "int8")
    for act in ("a32", "a16"):
        QM.quantized_activations = shipped if act == "a16" else (lambda x: x)
        f = jax.jit(lambda *a: overlap(*a))  # a new function: traced anew under each setting
        res[(scheme, act)] = np.concatenate([np.take_along_axis(np.asarray(f(m.weights, dw, jnp.asarray(seqs[c:c + 8]))),
                                                                idx[c:c + 8], 1) for c in range(0, n_rows, 8)])
        print(scheme, act, f"alpha_tv {res[(scheme, act)].mean():.5f}", flush=True)
    d = res[(scheme, "a16")] - res[(scheme, "a32")]
    print(f"{scheme} a16 - a32: {d.mean():.5f} (se over positions {d.std() / np.sqrt(d.size):.5f}, over rows "
          f"{d.mean(1).std() / np.sqrt(n_rows):.5f}; {n_rows} rows x {d.shape[1]} positions)", flush=True)
QM.quantized_activations = shipped
with open(sys.argv[3], "w") as fh:
    json.dump({"method": __doc__, "machine": machine(), "rows": n_rows, "new_tokens": new,
               "alpha_tv": {f"{k[0]}_{k[1]}": float(v.mean()) for k, v in res.items()},
               "per_row": {f"{k[0]}_{k[1]}": v.mean(1).tolist() for k, v in res.items()}}, fh, indent=1)
