"""Run by tests/test_sharding.py in a fresh process with 8 fake CPU devices (the device count must be set
before jax starts). Prints one line per check; exits non-zero on the first failure."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import er_jax  # noqa: E402
from er_jax.model import forward, init_weights  # noqa: E402
from er_jax.rl.grpo import GRPOConfig, Trainer  # noqa: E402
from er_jax.rl.tasks import TinyCopyTask, tiny_model_config  # noqa: E402
from er_jax.sharding import MeshConfig, cache_sharding, rows_sharding, shard_weights  # noqa: E402

MESHES = [MeshConfig(8, 1), MeshConfig(4, 2), MeshConfig(2, 4), MeshConfig(1, 8)]
CFG = er_jax.ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=1024, num_layers=2, num_heads=8,
                         num_kv_heads=8, head_dim=128, qkv_bias=True, eos_ids=(3, 17, 40), name="tp-tiny")
W = init_weights(CFG, jax.random.key(0), scale=0.08)
PROMPTS = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5], [9], [11, 12], [13]] * 2
RC = er_jax.RolloutConfig(temperature=0.0, max_new_tokens=12)


def check_rollouts():
    ref = er_jax.SpecRollout(CFG, W, mode="ar", max_batch=16, max_prompt_len=8, max_new_tokens=12).generate(PROMPTS, RC)
    assert len(set(ref.lengths.tolist())) > 1, "rows should finish at different steps (compaction)"
    for mc in MESHES:
        for mode, drafter in (("ar", "int4"), ("sd", "int4")) + ((("sd", "int8"),) if mc.model == 2 else ()):
            r = er_jax.SpecRollout(CFG, W, mode=mode, drafter=drafter, draft_length=3, max_batch=16,
                                   max_prompt_len=8, max_new_tokens=12, mesh=mc)
            out = r.generate(PROMPTS, RC)
            np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{mc} {mode} {drafter}")
            np.testing.assert_array_equal(out.lengths, ref.lengths)
            assert r.engine.max_batch % mc.data == 0
            if mode == "sd":
                wo = r.drafter["layers"]["wo"]
                assert wo.data.sharding.spec == jax.sharding.PartitionSpec(None, "model", None), wo.data.sharding
            print("rollout", mc, mode, drafter, "ok", flush=True)


def check_pallas_kernels_per_shard():
    """kernels="pallas" on a mesh: each kernel runs on its shard under shard_map (interpret mode here) and the
    greedy speculative rollout equals the single-device XLA one."""
    import functools
    from er_jax.engine import StepSpec, sd_step
    prompts, rc = PROMPTS[:4], er_jax.RolloutConfig(temperature=0.0, max_new_tokens=8)
    ref = er_jax.SpecRollout(CFG, W, mode="ar", max_batch=4, max_prompt_len=8, max_new_tokens=8).generate(prompts, rc)
    for mc, drafter in ((MeshConfig(2, 4), "int4"), (MeshConfig(4, 2), "int8")):
        r = er_jax.SpecRollout(CFG, W, mode="sd", drafter=drafter, draft_length=3, max_batch=4, max_prompt_len=8,
                               max_new_tokens=8, mesh=mc, kernels="pallas")
        out = r.generate(prompts, rc)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{mc} pallas {drafter}")
        st = r.engine.initial_state(4, 4, 0, np.full(4, 8, np.int32), np.zeros(4, np.int32))
        spec = StepSpec(CFG, rc.sampling, CFG.eos_ids, r.ex)
        jaxpr = str(jax.make_jaxpr(functools.partial(sd_step, spec, 3))(r.weights, r.drafter, st))
        assert "shard_map" in jaxpr and "pallas_call" in jaxpr
        print("pallas per shard", mc, drafter, "ok", flush=True)


def check_logprobs():
    toks = jax.random.randint(jax.random.key(1), (8, 10), 0, CFG.vocab_size)
    ref = jax.nn.log_softmax(forward(CFG, W, toks))
    for mc in MESHES:
        mesh = mc.make()
        ws = shard_weights(W, mesh)
        got = jax.jit(lambda w, t: jax.nn.log_softmax(forward(CFG, w, t)))(ws, toks)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        print("logprobs", mc, "ok", flush=True)


def check_cache_is_split():
    mesh = MeshConfig(2, 4).make()
    r = er_jax.SpecRollout(CFG, W, mode="ar", max_batch=4, max_prompt_len=8, max_new_tokens=4, mesh=mesh)
    st = r.engine.initial_state(4, 4, 0, np.full(4, 4, np.int32), np.zeros(4, np.int32))
    assert st.cache.k.sharding.is_equivalent_to(cache_sharding(mesh), 5)
    shard = st.cache.k.addressable_shards[0].data.shape
    assert shard == (CFG.num_layers, 2, r.engine.max_len, 2, CFG.head_dim), shard
    print("cache split ok", flush=True)


def check_checkpoint_reshard(tmp):
    import orbax.checkpoint as ocp
    src, dst = MeshConfig(4, 2).make(), MeshConfig(2, 4).make()
    ws = shard_weights(W, src)
    path = os.path.join(tmp, "weights")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, ws)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), W,
                                    jax.tree_util.tree_map(lambda a: a.sharding, shard_weights(W, dst)))
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(path, target)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(W)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["layers"]["wo"].sharding.mesh.shape == dst.shape
    print("checkpoint reshard ok", flush=True)


# GRPO on a mesh: the tiny copy task's model with 4 KV heads (so model=4 divides them), plain rollouts (the
# drafter on a mesh is checked above), temperature 1, two micro-batches and a KL reference.
class SpreadRewardCopyTask(TinyCopyTask):
    """The copy task's prompts, rewarded by the continuation's mean token id: the rewards of a group of 4
    differ unless all 4 continuations have the same token sum (~3e-6 per group for this near-uniform model), so
    the first step moves the policy off its KL reference whatever tokens were drawn. (The copy reward of the
    untrained model is 0 for every sample of both groups about as often as not; the update is then exactly
    zero and the check that the reference is used could not be made.)"""

    def reward(self, tokens, length, example):
        return float(np.mean(np.asarray(tokens)[:length])) / self.vocab_size


TCFG = tiny_model_config(num_kv_heads=4)
TW = init_weights(TCFG, jax.random.key(0), scale=0.1)
GCFG = GRPOConfig(prompts_per_step=2, samples=4, max_new_tokens=4, lr=1e-3, mode="ar", micro_batch=4,
                  kl_coef=0.05, seed=1)


def grpo_trainer(mesh, ckpt_dir=None):
    tr = Trainer(TCFG, TW, SpreadRewardCopyTask(TCFG.vocab_size, seed=1, max_new_tokens=GCFG.max_new_tokens), GCFG,
                 mesh=mesh, layout="stacked", ckpt_dir=ckpt_dir)
    outs, generate = [], tr.rollout.generate
    tr.rollout.generate = lambda *a, **k: outs.append(generate(*a, **k)) or outs[-1]  # keeps each rollout
    return tr, outs


def adam_mu(state):
    import optax
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return next(s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)).mu


def assert_same_step(m, ref, out, ref_out, what):
    np.testing.assert_array_equal(out.tokens, ref_out.tokens, err_msg=what)
    np.testing.assert_array_equal(out.lengths, ref_out.lengths, err_msg=what)
    assert m["reward"] == ref["reward"], (what, m["reward"], ref["reward"])
    for k in ("loss", "grad_norm", "objective", "kl"):
        np.testing.assert_allclose(m[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{what} {k}")


def leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def check_grpo(tmp):
    """One GRPO step on mesh (4, 2) equals the one-device step; its checkpoint restores bit-exact onto (2, 4)
    and onto one device, and all three continue with the same next step."""
    ckpt = os.path.join(tmp, "grpo")
    one, one_outs = grpo_trainer(None, ckpt)
    m_one = one.step()
    src, src_outs = grpo_trainer(MeshConfig(4, 2), ckpt)
    m = src.step()
    assert_same_step(m, m_one, src_outs[0], one_outs[0], "grpo (4, 2)")
    # Gradients through AdamW's mu = (1 - b1) g: equal up to f32 reduction-order noise. The params to what
    # that noise can do to Adam's first update, -lr * g / (|g| + eps) (optax's eps = 1e-8, no weight decay):
    # its slope eps / (|g| + eps)^2 is 1 / eps near g = 0, so an entry with |g| ~ 1e-8 turns a 1e-10 gradient
    # difference into ~lr * 1e-2 (2e-5 was seen at lr 1e-3), while large-gradient entries must agree closely.
    lr, eps = GCFG.lr, 1e-8
    for x, y, mx, my in zip(*(jax.tree_util.tree_leaves(t) for t in (src.state.params, one.state.params,
                                                                     adam_mu(src.state), adam_mu(one.state)))):
        np.testing.assert_allclose(np.asarray(mx), np.asarray(my), rtol=1e-5, atol=1e-7)
        g1, g2 = (np.asarray(m, np.float64) / (1 - GCFG.b1) for m in (mx, my))
        g_min = np.where(np.sign(g1) == np.sign(g2), np.minimum(np.abs(g1), np.abs(g2)), 0.0)
        slope = eps / (g_min + eps) ** 2  # the largest slope between g1 and g2
        bound = np.minimum(2 * lr, lr * slope * np.abs(g1 - g2)) + 1e-7  # + f32 rounding of the params
        worst = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) - bound
        assert worst.max() <= 0, f"params differ beyond the gradient noise's effect by {worst.max():.3g}"
    col = jax.sharding.PartitionSpec(None, None, "model")
    wq, mu = src.state.params["layers"]["wq"], adam_mu(src.state)["layers"]["wq"]
    assert wq.sharding.spec == col and mu.sharding.spec == col, (wq.sharding, mu.sharding)
    assert mu.sharding.mesh.shape == src.mesh.shape and mu.addressable_shards[0].data.shape[-1] == wq.shape[-1] // 2
    assert src.reference["layers"]["wq"].sharding.spec == col
    chunk = next(src._chunks({"adv": np.zeros(GCFG.rows, np.float32)}))
    assert chunk["adv"].sharding.is_equivalent_to(rows_sharding(src.mesh), 1)
    print("grpo step (4, 2) matches one device", flush=True)

    src.save()
    dst, dst_outs = grpo_trainer(MeshConfig(2, 4), ckpt)
    for tr in (dst, one):  # `one` drops its own step 1 for the (4, 2) one
        assert tr.restore() == 1 and tr.step_count == 1
        leaves_equal(tr.state.params, src.state.params)
        leaves_equal(tr.state.opt_state, src.state.opt_state)
    mu = adam_mu(dst.state)["layers"]["wq"]
    assert mu.sharding.spec == col and mu.sharding.mesh.shape == dst.mesh.shape
    m_src = src.step()
    assert m_src["kl"] > 0  # the reference is used
    assert_same_step(dst.step(), m_src, dst_outs[-1], src_outs[-1], "restored on (2, 4)")
    assert_same_step(one.step(), m_src, one_outs[-1], src_outs[-1], "restored on one device")
    print("grpo checkpoint (4, 2) -> (2, 4) and one device ok", flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    check_logprobs()
    check_cache_is_split()
    check_rollouts()
    check_pallas_kernels_per_shard()
    check_checkpoint_reshard(sys.argv[1])
    check_grpo(sys.argv[1])
    print("ALL OK")
