"""A drafter head over a vocabulary subset (a smaller LM head: what vocabulary trimming would buy). Tokens are
ranked by how often the target sampled them on acceptance.py's prompts 16-63 (T = 1, two seeds x 96 tokens; tokens
never seen follow by id). Then α (acceptance_tf.py's estimate) is measured on the held-out prompts 0-15 with the
int8 head's logits outside the top-`vs` set to -inf, for vs = V, 16384, 8192 and 4096. The output is printed only.

    python experiments/results/vnni_probes_1207/vocab_subset_alpha.py
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import er_jax  # noqa: E402
from acceptance import PROMPTS  # noqa: E402
from er_jax import model  # noqa: E402
from er_jax.quant import derive_drafter  # noqa: E402

m = er_jax.load_model("smollm2")
V = m.config.vocab_size


def sample(prompts, seed, n_new):
    ids = [m.tokenizer.chat([{"role": "user", "content": p}]) for p in prompts]
    r = er_jax.SpecRollout(m.config, m.weights, m.tokenizer, max_batch=len(ids), max_prompt_len=max(map(len, ids)),
                           max_new_tokens=n_new, mode="ar", kernels="xla")
    return ids, r.generate(ids, er_jax.RolloutConfig(temperature=1.0, seed=seed), min_new_tokens=[n_new] * len(ids))


counts = np.zeros(V)
for seed in (11, 12):
    ids, out = sample(PROMPTS[16:], seed, 96)
    for p, c in zip(ids, out.tokens):
        np.add.at(counts, np.asarray(list(p) + list(c)), 1)
print("calibration tokens", counts.sum(), "distinct", (counts > 0).sum())
order = np.argsort(-counts, kind="stable")
fwd = jax.jit(lambda w, t: model.forward(m.config, w, t))
for seed in (1, 2):
    ids, out = sample(PROMPTS[:16], seed, 96)
    seqs = [list(p) + list(c) for p, c in zip(ids, out.tokens)]
    toks = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    mask = np.zeros(toks.shape, bool)
    for i, (p, s) in enumerate(zip(ids, seqs)):
        toks[i, : len(s)] = s
        mask[i, len(p) - 1: len(s) - 1] = True
    p_t = np.asarray(jax.nn.softmax(fwd(m.weights, jnp.asarray(toks)), -1))[mask]
    for scheme in ("int8", "int4"):
        logits = np.asarray(fwd(derive_drafter(m.weights, scheme, head="int8"), jnp.asarray(toks)))[mask]
        for vs in (V, 16384, 8192, 4096):
            keep = np.zeros(V, bool)
            keep[order[:vs]] = True
            lg = np.where(keep, logits, -np.inf)
            q = np.exp(lg - lg.max(-1, keepdims=True))
            q /= q.sum(-1, keepdims=True)
            print(f"seed {seed} {scheme}: top-{vs}: α {np.minimum(p_t, q).sum(-1).mean():.4f}; "
                  f"target mass outside {p_t[:, ~keep].sum(-1).mean():.4f}", flush=True)
