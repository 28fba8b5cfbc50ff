"""Run by tests/test_sharding.py in a fresh process with 8 fake CPU devices (the device count must be set
before jax starts). Prints one line per check; exits non-zero on the first failure."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import er_jax  # noqa: E402
from er_jax.model import forward, init_weights  # noqa: E402
from er_jax.sharding import MeshConfig, cache_sharding, shard_weights  # noqa: E402

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
    st = r.engine._initial_state(4, 4, 0, np.full(4, 4, np.int32), np.zeros(4, np.int32))
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


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    check_logprobs()
    check_cache_is_split()
    check_rollouts()
    check_checkpoint_reshard(sys.argv[1])
    print("ALL OK")
