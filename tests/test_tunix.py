"""er_jax as a google-tunix rollout engine (er_jax.integrations.tunix), against tunix 0.1.7 itself.

Needs the optional extra: pip install -e ".[test,tunix]". Without tunix these tests skip, except under CI
(CI=true), where a missing tunix is a failure: CI must run them.

Every check is deterministic (f32 tolerances well above the ~1e-6 differences between two CPU
implementations of the same model, and far below any real mismatch); there is no statistical assertion.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import er_jax
from tests.helpers import slow_after

try:
    import tunix  # noqa: F401
    _MISSING = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _MISSING = f"{type(e).__name__}: {e}"

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
if _MISSING is not None and not IN_CI:
    pytest.skip(f"google-tunix is not installed ({_MISSING}); pip install -e '.[test,tunix]' to run the tunix "
                f"integration tests", allow_module_level=True)


def need_tunix():
    if _MISSING is not None:
        pytest.fail(f"CI is set but google-tunix is not importable ({_MISSING}); CI must install the 'tunix' extra: "
                    f"pip install -e '.[test,tunix]'", pytrace=False)
    from er_jax.integrations import tunix as T
    return T


def test_tunix_is_installed():
    need_tunix()


# -- tiny models and a character tokenizer ----------------------------------------------------------------

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?."
BOS, EOS = 1, 2


class CharTokenizer:
    """bos 1, eos 2 = pad (as tunix does for tokenizers without a pad token), characters from 3."""

    def encode(self, s, **kw):
        return [3 + CHARS.index(c) for c in s]

    def decode(self, ids, **kw):
        return "".join(CHARS[i - 3] if 3 <= i < 3 + len(CHARS) else "" for i in ids)

    def bos_id(self):
        return BOS

    def eos_id(self):
        return EOS

    def pad_id(self):
        return EOS


def tiny_config(family="llama3", tie=True, theta=1e6, layers=1, vocab=48) -> er_jax.ModelConfig:
    return er_jax.ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                              num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=theta, tie_embeddings=tie,
                              qkv_bias=family == "qwen2")


def random_weights(cfg, seed=1, scale=0.15):
    """Random er_jax weights with non-trivial norms and biases, so every tensor's mapping matters (numpy RNG: no
    jax op to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: er_jax.init_weights(cfg, jax.random.key(0)))
    norms = ("attn_norm", "mlp_norm", "final_norm")

    def draw(path, spec):
        name = jax.tree_util.keystr(path)
        if any(n in name for n in norms):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(spec.shape), spec.dtype)
        s = 0.1 if any(f"'{b}'" in name for b in ("bq", "bk", "bv")) else scale
        return jnp.asarray(s * rng.standard_normal(spec.shape), spec.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tunix_logits(model, tokens):
    """The tunix model's teacher-forced logits (jitted: op-by-op dispatch would compile every op on its own)."""
    from flax import nnx
    from tunix.sft import utils as sft_utils

    @nnx.jit
    def run(model, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model(tokens, pos, None, sft_utils.make_causal_attn_mask(jnp.ones(tokens.shape, bool)))[0]

    return run(model, tokens)


_forward = jax.jit(er_jax.forward, static_argnums=0)


def max_diff(a, b) -> float:
    return float(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)).max())


@pytest.fixture
def restore_llama3_module():
    """fix_tunix_llama3_rope patches tunix's module; put it back so tests stay independent."""
    if _MISSING is not None:
        yield
        return
    from tunix.models.llama3 import model as l3
    saved = (l3.apply_rope, l3.Attention.block)
    yield
    l3.apply_rope, l3.Attention.block = saved


# -- weights: both directions ------------------------------------------------------------------------------

WEIGHT_CASES = [("llama3", True), ("qwen2", False), ("llama3", False), ("qwen2", True)]


@pytest.mark.parametrize("family,tie", slow_after(WEIGHT_CASES, keep=2))
def test_weights_map_both_ways(family, tie):
    T = need_tunix()
    from flax import nnx
    cfg = tiny_config(family, tie, theta=1e6 if family == "llama3" else 1e4, layers=2, vocab=96)
    toks = jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)

    # er_jax -> tunix: the same logits, and the reverse map gives back the very same arrays
    w = random_weights(cfg)
    model = T.tunix_model_from_weights(cfg, w, family)
    assert max_diff(_forward(cfg, w, toks), tunix_logits(model, toks)) <= 1e-5
    cfg_back = T.er_config_from_tunix(model)
    assert cfg_back.replace(name=cfg.name) == cfg
    back = T.weights_from_tunix(cfg_back, T.flatten_params(nnx.state(model, nnx.Param)))
    assert jax.tree.structure(back) == jax.tree.structure(w)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)))

    # tunix -> er_jax: a tunix model with its own random parameters
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(3)
    leaves = [jnp.asarray(0.15 * rng.standard_normal(a.shape) + (a.ndim == 1 and a.shape[0] == cfg.hidden_size),
                          a.dtype) for a in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    w2 = T.weights_from_tunix(cfg, T.flatten_params(nnx.state(model, nnx.Param)))
    assert max_diff(_forward(cfg, w2, toks), tunix_logits(model, toks)) <= 1e-5


def test_update_params_stays_on_device_and_rederives_the_drafter():
    """What tunix's sync_weights does: nnx.state(actor, nnx.Param) under a guard that forbids every host
    transfer on CPU. The mapping itself must pass a guard that forbids all transfers."""
    T = need_tunix()
    from flax import nnx
    cfg = tiny_config()
    model = T.tunix_model_from_weights(cfg, random_weights(cfg), "llama3")
    rollout = T.ErJaxRollout(rollout_actor=model, tokenizer=CharTokenizer(), mesh=None, mode="sd", drafter="int8",
                             max_batch=2, spec_rollout_kwargs=dict(layout="stacked"))
    assert rollout.update_times[-1]["derive_s"] is not None
    w_new = random_weights(cfg, seed=5)
    nnx.update(model, nnx.State(T.tunix_state_from_weights(cfg, w_new)))
    state = nnx.state(model, nnx.Param)
    with jax.transfer_guard("disallow_explicit"):
        T.weights_from_tunix(rollout.config, T.flatten_params(state))  # no host round trip at all
    with jax.transfer_guard_device_to_host("disallow_explicit"), jax.transfer_guard_host_to_device("disallow_explicit"):
        rollout.update_params(state, (nnx.Param,))
    assert len(rollout.update_times) == 2 and rollout.update_times[-1]["derive_s"] is not None
    ours = [a for a in jax.tree.leaves(rollout.weights)]
    assert all(bool((a == b).all()) for a, b in zip(ours, jax.tree.leaves(w_new)))
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(rollout.spec.weights),
                                                    jax.tree.leaves(er_jax.SpecRollout(
                                                        cfg, w_new, max_batch=1, max_prompt_len=4, max_new_tokens=1,
                                                        layout="stacked").weights)))
    with pytest.raises(ValueError, match="LoRA"):
        rollout.update_params(state, (nnx.LoRAParam,))


def test_llama3_rope_base(restore_llama3_module):
    """tunix 0.1.7's Llama 3 rotates with base 1e6 whatever its config says. The adapter keeps the configured
    base, refuses to run beside the bug unless told how, and fix_tunix_llama3_rope() mends tunix."""
    T = need_tunix()
    cfg = tiny_config(theta=1e4)
    w = random_weights(cfg)
    toks = jax.random.randint(jax.random.key(2), (1, 24), 0, cfg.vocab_size)
    model = T.tunix_model_from_weights(cfg, w, "llama3")
    if T._llama3_ignores_rope_theta():  # the 0.1.7 behaviour
        assert max_diff(tunix_logits(model, toks), _forward(cfg.replace(rope_theta=1e6), w, toks)) <= 1e-5
        assert max_diff(tunix_logits(model, toks), _forward(cfg, w, toks)) > 1e-2
        with pytest.raises(ValueError, match="fix_tunix_llama3_rope"):
            T.ErJaxRollout(rollout_actor=model, tokenizer=CharTokenizer(), mode="ar")
        r = T.ErJaxRollout(rollout_actor=model, tokenizer=CharTokenizer(), mode="ar", rope_theta=1e6)
        assert r.config.rope_theta == 1e6
    T.fix_tunix_llama3_rope()
    assert not T._llama3_ignores_rope_theta()
    model = T.tunix_model_from_weights(cfg, w, "llama3")
    assert max_diff(tunix_logits(model, toks), _forward(cfg, w, toks)) <= 1e-5
    assert T.ErJaxRollout(rollout_actor=model, tokenizer=CharTokenizer(), mode="ar").config.rope_theta == 1e4


def test_unsupported_models_and_fields_are_refused():
    T = need_tunix()
    from flax import nnx
    from tunix.models.qwen3 import model as q3
    from tunix.rl.rollout import base_rollout
    qcfg = q3.ModelConfig(num_layers=1, vocab_size=48, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                          num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6)
    qwen3 = nnx.eval_shape(lambda: q3.Qwen3(qcfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="q_norm"):
        T.ErJaxRollout(rollout_actor=qwen3, tokenizer=CharTokenizer())
    cfg = tiny_config()
    model = T.tunix_model_from_weights(cfg, random_weights(cfg), "llama3")
    make = functools.partial(T.ErJaxRollout, rollout_actor=model, tokenizer=CharTokenizer(), mode="ar")
    for field, value, match in [("rollout_vllm_hbm_utilization", 0.5, "vLLM"),
                                ("rollout_sglang_jax_page_size", 64, "SG-Lang"),
                                ("expert_parallel_size", 2, "expert"),
                                ("tensor_parallel_size", 2, "tensor_parallel_size")]:
        with pytest.raises(ValueError, match=match):
            make(rollout_config=base_rollout.RolloutConfig(**{field: value}))
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="fast")
    with pytest.raises(ValueError, match="unknown keyword"):
        make(kernel="xla")
    with pytest.raises(ValueError, match="q_norm|Llama 3"):
        make(rollout_actor=object())


def test_seed_maps_to_the_same_key():
    T = need_tunix()
    for s in (0, 7, 2**31 - 1, -1, -12345):  # PRNGKey(n): the very same key
        k = jax.random.PRNGKey(s)
        assert (jax.random.key_data(jax.random.key(T._seed_int(k))) == k).all()
    assert T._seed_int(None) == 0 and T._seed_int(5) == 5
    keys = [jax.random.fold_in(jax.random.key(3), i) for i in range(4)]
    keys += list(jax.random.split(jax.random.PRNGKey(1), 4))
    seeds = [T._seed_int(k) for k in keys]  # other keys: deterministic, distinct, valid int seeds
    assert seeds == [T._seed_int(k) for k in keys] and len(set(seeds)) == len(seeds)
    assert all(-2**31 <= s < 2**31 for s in seeds)


@pytest.mark.slow
def test_generate_translates_tunix_semantics():
    """Outputs in tunix's shapes and conventions: tokens before the first EOS, prompts left-padded to
    max_prompt_length, log-probs = tunix's recomputation (also with top-k / top-p, where tunix's convention is the
    full-vocabulary softmax), greedy when top_p is None, get_per_token_logps = tunix's compute_per_token_logps."""
    T = need_tunix()
    from flax import nnx
    from tunix.rl import common
    from tunix.rl.rollout import base_rollout
    cfg = tiny_config()
    model = T.tunix_model_from_weights(cfg, random_weights(cfg, scale=0.4), "llama3")
    rc = base_rollout.RolloutConfig(max_tokens_to_generate=12, max_prompt_length=8, temperature=0.8, top_p=0.9,
                                    top_k=20, return_logprobs=True, seed=jax.random.PRNGKey(4))
    r = T.ErJaxRollout(rollout_actor=model, tokenizer=CharTokenizer(), rollout_config=rc, mode="sd",
                       drafter="int8", spec_rollout_kwargs=dict(layout="stacked"))
    # the last prompt holds the pad id (2) inside: tunix masks it, in its sampler and in its trainer, and so must we
    prompts = ["abc", "1+2=", "hello", [BOS, 3 + CHARS.index("x"), EOS, 3 + CHARS.index("y")]]
    out = r.generate(prompts, rc)
    assert out.left_padded_prompt_tokens.shape == (4, 8)
    assert out.left_padded_prompt_tokens[1].tolist() == [EOS] * 3 + [BOS] + CharTokenizer().encode("1+2=")
    assert all(EOS not in t.tolist() and 0 < len(t) + 1 and len(t) <= 12 for t in out.tokens)
    assert out.left_padded_prompt_tokens[3].tolist() == [EOS] * 4 + prompts[3]
    assert out.text == [CharTokenizer().decode(t.tolist()) for t in out.tokens]
    assert r.last_stats["sd_steps"] > 0

    comp = np.full((4, 12), EOS, np.int32)
    for i, t in enumerate(out.tokens):
        comp[i, : len(t)] = t
    graphdef, state = nnx.split(model)
    ref = common.compute_per_token_logps(graphdef, state, prompt_tokens=jnp.asarray(out.left_padded_prompt_tokens),
                                         completion_tokens=jnp.asarray(comp), pad_id=EOS, eos_id=EOS,
                                         temperature=0.8)
    for i, t in enumerate(out.tokens):
        assert max_diff(out.logprobs[i], ref[i, : len(t)]) <= 1e-4
    mask = comp != EOS
    ours = r.get_per_token_logps(out.left_padded_prompt_tokens, comp)
    assert max_diff(jnp.where(mask, ours, 0), jnp.where(mask, ref, 0)) <= 1e-4

    # the same seed gives the same samples; greedy (top_p None) equals argmax decoding
    again = r.generate(prompts, rc)
    assert all((a == b).all() for a, b in zip(out.tokens, again.tokens))
    greedy = r.generate(prompts, base_rollout.RolloutConfig(max_tokens_to_generate=12, max_prompt_length=8,
                                                            top_p=None, return_logprobs=True))
    i = next(i for i, t in enumerate(greedy.tokens[:3]) if len(t))
    prompt = [BOS] + CharTokenizer().encode(prompts[i])
    seq = jnp.asarray([prompt + greedy.tokens[i][:-1].tolist()])
    assert (np.asarray(jnp.argmax(_forward(cfg, r.weights, seq), -1))[0, len(prompt) - 1:]
            == greedy.tokens[i]).all()

    with pytest.raises(ValueError, match="max_prompt_len"):
        r.generate(["abcdefghijk"], rc)
    with pytest.raises(ValueError, match="max_batch"):
        r.generate(["a"] * 5, rc)
    with pytest.raises(ValueError, match="max_new_tokens"):
        r.generate(["a"], base_rollout.RolloutConfig(max_tokens_to_generate=13, max_prompt_length=8))
    with pytest.raises(ValueError, match="data_type"):
        r.generate(["a"], base_rollout.RolloutConfig(max_tokens_to_generate=4, data_type=jnp.bfloat16))


# -- a real GRPO run ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_with_er_jax_rollouts_adaptive():
    """tunix's GRPOLearner trains a tiny Llama 3 for a few steps with RLCluster(rollout_engine=ErJaxRollout in
    adaptive mode). At every rollout, the rollout's per-token log-probs equal tunix's own recomputation with the
    policy's weights at that moment (<= 1e-4, f32), and so do the old-policy log-probs tunix asks the rollout
    for (num_iterations=2); the weights really change between rollouts."""
    T = need_tunix()
    import optax
    from flax import nnx
    from tunix.rl import common, rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    cfg = tiny_config()
    actor = T.tunix_model_from_weights(cfg, random_weights(cfg, scale=0.3), "llama3")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    checks: list[dict] = []
    holder = {}

    def snapshot():
        return jax.tree.map(lambda a: a + 0, nnx.state(holder["actor"]))  # arrays now, not live Variables

    def tunix_logps(state, prompts, completions, temperature):
        return common.compute_per_token_logps(nnx.graphdef(holder["actor"]), state, prompt_tokens=jnp.asarray(prompts),
                                              completion_tokens=jnp.asarray(completions), pad_id=EOS, eos_id=EOS,
                                              temperature=temperature)

    class Checked(T.ErJaxRollout):
        def generate(self, prompts, rollout_config=None, **kw):
            ts = time.perf_counter()
            out = super().generate(prompts, rollout_config, **kw)
            gen_s = time.perf_counter() - ts
            comp = np.full((len(out.tokens), rollout_config.max_tokens_to_generate), EOS, np.int32)
            for i, t in enumerate(out.tokens):
                comp[i, : len(t)] = t
            ref = tunix_logps(snapshot(), out.left_padded_prompt_tokens, comp, rollout_config.temperature)
            diff = max(max_diff(out.logprobs[i], ref[i, : len(t)]) if len(t) else 0.0
                       for i, t in enumerate(out.tokens))
            checks.append(dict(kind="rollout", diff=diff, sd_steps=self.last_stats["sd_steps"], s=gen_s,
                               weights=jax.tree.map(lambda a: a + 0, self.weights)))
            return out

        def get_per_token_logps(self, prompt_tokens, completion_tokens, temperature=None):
            ours = super().get_per_token_logps(prompt_tokens, completion_tokens, temperature)
            ref = tunix_logps(snapshot(), prompt_tokens, completion_tokens, self._defaults.temperature)
            mask = np.asarray(completion_tokens) != EOS
            checks.append(dict(kind="old_logps", diff=max_diff(jnp.where(mask, ours, 0), jnp.where(mask, ref, 0))))
            return ours

    rc = base_rollout.RolloutConfig(max_tokens_to_generate=16, max_prompt_length=8, temperature=1.0, top_p=1.0,
                                    return_logprobs=True)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine=functools.partial(Checked, mode="adaptive", spec_rollout_kwargs=dict(layout="stacked")),
        offload_to_cpu=False,
        # AdamW's decoupled weight decay moves the weights at every step even when a group's rewards tie (zero
        # advantage), so "the synced weights change between rollouts" below holds deterministically.
        training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.adamw(3e-3, weight_decay=0.1),
                                                        eval_every_n_steps=1000,
                                                        max_steps=6),
        rollout_config=rc)
    cluster = rl_cluster_lib.RLCluster(actor=actor, tokenizer=CharTokenizer(), cluster_config=cluster_config)
    holder["actor"] = cluster.actor_trainer.model
    assert isinstance(cluster.rollout, T.ErJaxRollout)

    def reward(prompts, completions, **kw):  # favour the letter "a"
        return [c.count("a") / max(len(c), 1) for c in completions]

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=grpo_learner.GRPOConfig(
        num_generations=2, num_iterations=2, beta=0.0), reward_fns=[reward])
    t0 = time.perf_counter()
    learner.train([{"prompts": np.array(["ab"])} for _ in range(3)])
    elapsed = time.perf_counter() - t0

    rollouts = [c for c in checks if c["kind"] == "rollout"]
    olds = [c for c in checks if c["kind"] == "old_logps"]
    assert len(rollouts) == 3 and len(olds) == 3, (len(rollouts), len(olds))
    assert all(c["diff"] <= 1e-4 for c in checks), [(c["kind"], c["diff"]) for c in checks]
    for a, b in zip(rollouts, rollouts[1:]):  # synced weights differ from one rollout to the next
        assert max(max_diff(x, y) for x, y in zip(jax.tree.leaves(a["weights"]), jax.tree.leaves(b["weights"]))) > 0
    assert len(cluster.rollout.update_times) >= 3
    print(f"GRPO: {len(rollouts)} rollouts ({[round(c['s'], 1) for c in rollouts]} s), sd steps "
          f"{[c['sd_steps'] for c in rollouts]}, max |Δ logp| "
          f"{max(c['diff'] for c in checks):.2e}, train {elapsed:.1f} s")
