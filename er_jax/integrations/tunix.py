"""er_jax as a rollout engine inside google-tunix (tested with tunix 0.1.7).

Tunix's `RLCluster` accepts any `BaseRollout` subclass, or a `functools.partial` of one, as its rollout engine:

    import functools
    from er_jax.integrations.tunix import ErJaxRollout
    cluster_config = rl_cluster_lib.ClusterConfig(
        ..., rollout_engine=functools.partial(ErJaxRollout, mode="adaptive", drafter="int4"))

`ErJaxRollout` wraps `er_jax.SpecRollout`: every mode (ar / sd / toggle / adaptive / auto), drafter (int4 / int8)
and mesh option is a constructor keyword. It maps the tunix policy's `nnx.Param` state (Llama 3 and Qwen 2 as
tunix defines them, tied embeddings and QKV bias included) onto er_jax's weights pytree with jnp ops only, so
weights never leave the devices they live on, and re-derives the drafter at every `update_params`.

What it translates and what it refuses is in docs/tunix.md. In short:
- outputs follow tunix's vanilla sampler: completion tokens stop before the first EOS (the EOS itself is not
  returned), prompts come back left-padded to `max_prompt_length`, log-probs are tunix's: the full-vocabulary
  log-softmax of the temperature-scaled logits (raw logits for greedy), which is what tunix's trainer recomputes;
- fields that only configure another engine (`rollout_vllm_*`, `rollout_sglang_jax_*`, `rollout_mapping_config`),
  LoRA syncs, Qwen 3 (q/k norms, which er_jax's decoder has no place for) and expert parallelism are refused
  with a ValueError that says what to do;
- tunix 0.1.7's Llama 3 attention ignores `config.rope_theta` and always rotates with base 1e6. The adapter uses
  the configured base (the weights' reference). So that trainer and rollout agree, call `fix_tunix_llama3_rope()`
  before training (tunix then uses the configured base too), or pass `rope_theta=1e6` to reproduce tunix's model
  on purpose; a Llama 3 policy whose base is not 1e6 is refused until one of the two is chosen.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

try:
    import tunix  # noqa: F401
    from tunix.rl.rollout import base_rollout
except ImportError as e:  # pragma: no cover - exercised only without tunix
    raise ImportError("er_jax.integrations.tunix needs google-tunix: pip install 'er-jax[tunix]' "
                      "(or pip install google-tunix==0.1.7)") from e

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import er_jax
from er_jax.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["ErJaxRollout", "TunixTokenizer", "er_config_from_tunix", "fix_tunix_llama3_rope", "model_family",
           "tunix_model_from_weights", "tunix_state_from_weights", "weights_from_tunix"]

# -- model families ---------------------------------------------------------------------------------------

FAMILIES = ("llama3", "qwen2")
TUNIX_ROPE_BASE = 1_000_000  # what tunix 0.1.7's Llama 3 attention always uses


def _tunix_models():
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen2 import model as qwen2
    from tunix.models.qwen3 import model as qwen3
    return llama3, qwen2, qwen3


def model_family(model) -> str:
    """"llama3" or "qwen2" for a tunix model (or its config); a ValueError for anything er_jax cannot run."""
    llama3, qwen2, qwen3 = _tunix_models()
    cfg = getattr(model, "config", model)
    if isinstance(model, llama3.Llama3) or isinstance(cfg, llama3.ModelConfig):
        return "llama3"
    if isinstance(model, qwen2.Qwen2) or isinstance(cfg, qwen2.ModelConfig):
        return "qwen2"
    if isinstance(model, qwen3.Qwen3) or isinstance(cfg, qwen3.ModelConfig):
        raise ValueError("Qwen3 is not supported by er_jax: its attention normalizes each query and key head "
                         "(q_norm / k_norm RMSNorm) and er_jax's decoder has no such layer, so it could not "
                         "reproduce the policy's logits. Use a Llama 3 or Qwen 2 policy with ErJaxRollout, or "
                         "tunix's 'vanilla' rollout engine for Qwen3")
    raise ValueError(f"ErJaxRollout runs tunix's Llama 3 (tunix.models.llama3) and Qwen 2 (tunix.models.qwen2) "
                     f"models; got {type(model).__module__}.{type(model).__name__}. Use tunix's 'vanilla' "
                     f"engine for other architectures")


def _llama3_ignores_rope_theta() -> bool:
    """True while tunix's Llama 3 attention calls apply_rope without the configured base (tunix 0.1.7)."""
    llama3 = _tunix_models()[0]
    if getattr(llama3.apply_rope, "_er_jax_fixed", False):
        return False
    try:
        return "rope_theta" not in inspect.getsource(llama3.Attention.block)
    except (OSError, TypeError):  # no source: assume the 0.1.7 behaviour
        return True


_ROPE_STATE = threading.local()


def fix_tunix_llama3_rope() -> bool:
    """Make tunix's Llama 3 attention rotate with its configured `rope_theta` (tunix 0.1.7 always uses 1e6).

    Patches `tunix.models.llama3.model` in this process: every Llama3 model built or run afterwards uses
    `config.rope_theta`, so tunix's trainer computes the same model as the weights' reference (and as
    ErJaxRollout). Idempotent; returns False when nothing needed patching (a tunix that passes the base itself).
    """
    llama3 = _tunix_models()[0]
    if not _llama3_ignores_rope_theta():
        return False
    orig_rope, orig_block = llama3.apply_rope, llama3.Attention.block

    @functools.wraps(orig_rope)
    def apply_rope(inputs, positions, head_dim, rope_theta=None):
        if rope_theta is None:
            rope_theta = getattr(_ROPE_STATE, "theta", None) or TUNIX_ROPE_BASE
        return orig_rope(inputs, positions, head_dim=head_dim, rope_theta=rope_theta)

    @functools.wraps(orig_block)
    def block(self, *args, **kwargs):
        prev = getattr(_ROPE_STATE, "theta", None)
        _ROPE_STATE.theta = self.config.rope_theta  # read by apply_rope while this layer is traced
        try:
            return orig_block(self, *args, **kwargs)
        finally:
            _ROPE_STATE.theta = prev

    apply_rope._er_jax_fixed = True
    llama3.apply_rope = apply_rope
    llama3.Attention.block = block
    return True


def _dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"er_jax runs float32, bfloat16 or float16 weights; got {name}. Set "
                         f"RolloutConfig.data_type to one of those")
    return name


def er_config_from_tunix(model, *, dtype=None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                         bos_id: int | None = None, rope_theta: float | None = None) -> ModelConfig:
    """The er_jax ModelConfig of a tunix Llama 3 / Qwen 2 model (or config). `rope_theta` overrides the
    configured RoPE base; `dtype` defaults to the model's parameter dtype."""
    family = model_family(model)
    c = getattr(model, "config", model)
    if dtype is None:
        if isinstance(model, nnx.Module):
            dtype = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))[0].dtype
        else:
            dtype = getattr(c, "param_dtype", jnp.float32)
    tie = c.weight_tying if family == "llama3" else c.use_tied_embedding
    return ModelConfig(vocab_size=c.vocab_size, hidden_size=c.embed_dim, intermediate_size=c.hidden_dim,
                       num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                       head_dim=c.head_dim, rope_theta=float(c.rope_theta if rope_theta is None else rope_theta),
                       rms_norm_eps=float(c.norm_eps), tie_embeddings=bool(tie), qkv_bias=family == "qwen2",
                       dtype=_dtype_name(dtype), name=f"tunix-{family}", bos_id=bos_id,
                       eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))


# -- weights: tunix nnx.Param state <-> er_jax pytree -------------------------------------------------------
# er_jax layer key -> (tunix path inside layers.<i>, shape of the tunix tensor as a function of the config).
# tunix stores q/k/v as [D, heads, head_dim] and o as [heads, head_dim, D]; head-major flattening gives
# er_jax's [D, heads*head_dim] / [heads*head_dim, D] (both rotate-half RoPE, so no permutation).

def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    m = {"attn_norm": ("input_layernorm.w", (d,)),
         "wq": ("attn.q_proj.w", (d, h, hd)), "wk": ("attn.k_proj.w", (d, kv, hd)),
         "wv": ("attn.v_proj.w", (d, kv, hd)), "wo": ("attn.o_proj.w", (h, hd, d)),
         "mlp_norm": ("post_attention_layernorm.w", (d,)),
         "w_gate": ("mlp.gate_proj.kernel", (d, f)), "w_up": ("mlp.up_proj.kernel", (d, f)),
         "w_down": ("mlp.down_proj.kernel", (f, d))}
    if cfg.qkv_bias:
        m.update(bq=("attn.q_bias", (h * hd,)), bk=("attn.k_bias", (kv * hd,)), bv=("attn.v_bias", (kv * hd,)))
    return m


def _global_map(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    m = {"embed": ("embedder.input_embedding", (cfg.vocab_size, cfg.hidden_size)),
         "final_norm": ("final_norm.w", (cfg.hidden_size,))}
    if not cfg.tie_embeddings:
        m["lm_head"] = ("lm_head.w", (cfg.hidden_size, cfg.vocab_size))
    return m


def expected_paths(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tunix parameter path (dotted) an er_jax config corresponds to, with its shape."""
    out = {p: s for p, s in _global_map(cfg).values()}
    for i in range(cfg.num_layers):
        out.update({f"layers.{i}.{p}": s for p, s in _layer_map(cfg).values()})
    return out


def flatten_params(params) -> dict[str, Any]:
    """A tunix nnx.State / nested dict of Params -> {"layers.0.attn.q_proj.w": array, ...} (no copies)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    out: dict[str, Any] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, nnx.Variable):
            out[prefix] = node.get_value() if hasattr(node, "get_value") else node.value
        else:
            out[prefix] = node

    walk("", params)
    return out


def weights_from_tunix(cfg: ModelConfig, flat: Mapping[str, Any]) -> dict:
    """er_jax's weights pytree (docs/internals.md) from a flat tunix parameter dict: jnp reshapes, a stack over
    layers and a cast to `cfg.dtype`, all on the arrays' own devices (no host round trip)."""
    want = expected_paths(cfg)
    missing = [p for p in want if p not in flat]
    if missing:
        raise ValueError(f"the tunix parameters lack {len(missing)} tensors er_jax needs, e.g. {missing[:4]}; "
                         f"pass the policy's full nnx.Param state (nnx.state(model, nnx.Param))")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise ValueError(f"the tunix parameters hold tensors er_jax's {cfg.name} decoder has no place for, e.g. "
                         f"{extra[:4]} ({len(extra)} in all); this architecture (or a LoRA / MoE variant of it) "
                         f"cannot be served by ErJaxRollout")
    for p, shape in want.items():
        got = tuple(getattr(flat[p], "shape", ()))
        if got != shape:
            raise ValueError(f"tunix parameter {p} has shape {got}, expected {shape} for this model config")
    dt = cfg.jnp_dtype

    def two_d(a, rows: int):
        return jnp.reshape(a, (rows, -1)).astype(dt)

    layers = {}
    for key, (path, shape) in _layer_map(cfg).items():
        per = [flat[f"layers.{i}.{path}"] for i in range(cfg.num_layers)]
        if key == "wo":
            per = [two_d(a, shape[0] * shape[1]) for a in per]
        elif len(shape) == 3:
            per = [two_d(a, shape[0]) for a in per]
        else:
            per = [jnp.asarray(a).astype(dt) for a in per]
        layers[key] = jnp.stack(per)
    g = _global_map(cfg)
    weights = {"embed": flat[g["embed"][0]].astype(dt), "layers": layers,
               "final_norm": flat[g["final_norm"][0]].astype(dt)}
    if not cfg.tie_embeddings:
        weights["lm_head"] = flat[g["lm_head"][0]].astype(dt)
    return weights


def tunix_state_from_weights(cfg: ModelConfig, weights, dtype=None) -> dict:
    """The reverse map: a nested pure dict of tunix parameters (for `nnx.replace_by_pure_dict` / `nnx.update`)."""
    dt = cfg.jnp_dtype if dtype is None else dtype
    out: dict = {}

    def put(path: str, value):
        node = out
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value).astype(dt)

    for key, (path, shape) in _global_map(cfg).items():
        put(path, weights[key])
    for key, (path, shape) in _layer_map(cfg).items():
        for i in range(cfg.num_layers):
            put(f"layers.{i}.{path}", jnp.reshape(weights["layers"][key][i], shape))
    return out


def tunix_model_from_weights(cfg: ModelConfig, weights, family: str = "llama3", *, rngs=None, **config_kw):
    """A tunix Llama3 / Qwen2 nnx model holding er_jax `weights` (tests, benchmarks, the example). `config_kw`
    go to the tunix ModelConfig (e.g. `shd_config`). The tunix config carries `cfg.rope_theta`; tunix 0.1.7's
    Llama 3 ignores it unless `fix_tunix_llama3_rope()` ran."""
    llama3, qwen2, _ = _tunix_models()
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "qwen2" and not cfg.qkv_bias:
        raise ValueError("tunix's Qwen2 always has q/k/v biases; build it from an er_jax config with qkv_bias=True "
                         "(zero biases reproduce a bias-free model)")
    if family == "llama3" and cfg.qkv_bias:
        raise ValueError("tunix's Llama3 has no q/k/v biases; use family='qwen2' for a config with qkv_bias=True")
    common = dict(num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
                  hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                  num_kv_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.rms_norm_eps)
    if family == "llama3":
        tcfg = llama3.ModelConfig(**common, weight_tying=cfg.tie_embeddings, **config_kw)
        abstract = nnx.eval_shape(lambda: llama3.Llama3(tcfg, rngs=nnx.Rngs(0)))
    else:
        config_kw.setdefault("dtype", cfg.jnp_dtype)
        config_kw.setdefault("param_dtype", cfg.jnp_dtype)
        tcfg = qwen2.ModelConfig(**common, use_tied_embedding=cfg.tie_embeddings, **config_kw)
        abstract = nnx.eval_shape(lambda: qwen2.Qwen2(tcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, tunix_state_from_weights(cfg, weights))
    return nnx.merge(graphdef, state)


# -- tokenizer ----------------------------------------------------------------------------------------------

class TunixTokenizer:
    """An er_jax tokenizer (`er_jax.load_model(...).tokenizer`) with the methods tunix's TokenizerAdapter asks
    for: encode, decode, bos_id(), eos_id(), pad_id(), apply_chat_template."""

    def __init__(self, tokenizer, eos_id: int | None = None, pad_id: int | None = None):
        self._tok = tokenizer
        self._eos = int(tokenizer.eos_ids[0] if eos_id is None else eos_id)
        self._pad = int(tokenizer.pad_id if pad_id is None else pad_id)

    def encode(self, text: str, **kwargs) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids, **kwargs) -> str:
        return self._tok.decode([int(i) for i in ids])

    def bos_id(self):
        return self._tok.bos_id

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        text = self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self._tok.backend.encode(text, add_special_tokens=False).ids if tokenize else text


# -- log-probs the way tunix computes them ------------------------------------------------------------------

def _teacher_forced_logps(cfg: ModelConfig, pad_id: int, temperature: float, weights, prompt, completion):
    """Tunix's per-token log-probs (rl.common.compute_per_token_logps) with er_jax's forward: every token equal to
    `pad_id` is masked (not attended to, skipped by positions). Dropping masked tokens is the same computation,
    so each row's kept tokens are moved to the front and run as a right-padded row. Masked completion positions
    (and a first completion token with no real prompt before it) get 0."""
    seq = jnp.concatenate([prompt, completion], axis=1)
    keep = seq != pad_id
    order = jnp.argsort(~keep, axis=1, stable=True)
    compact = jnp.take_along_axis(seq, order, axis=1)
    logits = er_jax.forward(cfg, weights, compact)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = prompt.shape[1]
    pos = (jnp.cumsum(keep, axis=1) - 1)[:, p:]  # compacted position of each completion token
    prev = jnp.maximum(pos - 1, 0)
    rows = jnp.take_along_axis(logp, prev[:, :, None], axis=1)  # [B, C, V]
    lp = jnp.take_along_axis(rows, completion[:, :, None].astype(jnp.int32), axis=2)[:, :, 0]
    return jnp.where(keep[:, p:] & (pos >= 1), lp, 0.0)


# -- the rollout engine -------------------------------------------------------------------------------------

MODES = ("ar", "sd", "toggle", "adaptive", "auto")
DRAFTERS = ("int4", "int8")
_DATA_AXES = ("data", "dp", "fsdp", "batch")
_MODEL_AXES = ("model", "tp", "tensor")
_OTHER_ENGINE_PREFIXES = ("rollout_vllm_", "rollout_sglang_jax_")


def _seed_int(seed) -> int:
    """tunix's seed (None, an int, or a jax key) -> er_jax's int seed. `PRNGKey(n)` (what tunix builds from an int)
    maps to the int whose `jax.random.key` is that very key; any other key (split / fold_in) to a 32-bit seed
    drawn from it, so distinct keys give distinct streams. (jax without x64 keeps 32 bits of an int seed.)"""
    if seed is None:
        return 0  # tunix's sampler: PRNGKey(0)
    if isinstance(seed, (int, np.integer)):
        return int(seed)
    a = jnp.asarray(seed) if not isinstance(seed, jax.Array) else seed
    typed = jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(a) if typed else a).reshape(-1)
    if data.shape != (2,) or data.dtype != np.uint32:
        raise ValueError(f"RolloutConfig.seed must be None, an int or a threefry jax key (2 uint32 words); got "
                         f"dtype {data.dtype} shape {tuple(np.shape(a))}. Pass jax.random.PRNGKey(n) or an int")
    hi, lo = int(data[0]), int(data[1])
    if hi != 0:
        key = a if typed else jax.random.wrap_key_data(a)
        lo = int(np.asarray(jax.random.bits(key, (), jnp.uint32)))
    return lo - (1 << 32) if lo >= 1 << 31 else lo


class ErJaxRollout(base_rollout.BaseRollout):
    """A tunix rollout engine backed by er_jax's self-speculative `SpecRollout`.

    RLCluster passes `rollout_actor` (the tunix policy), `tokenizer`, `mesh` and `rollout_config` (the TRAIN one);
    everything else is a keyword for `functools.partial`:

    mode, drafter, draft_length: SpecRollout's (modes "ar" "sd" "toggle" "adaptive" "auto"; drafters "int4" "int8").
    er_mesh: "tunix" (default: tunix's rollout mesh, its fsdp/dp axes as "data" and tp as "model"; one device
        -> none), None (one device), an er_jax.sharding.MeshConfig or a jax Mesh with axes ("data", "model").
    max_batch: rows per generate call (default: the first call's count; later calls may not exceed it).
    max_prompt_len / max_new_tokens: the engine's limits (default: the rollout config's max_prompt_length /
        max_tokens_to_generate); they size the KV cache.
    rope_theta: override the RoPE base (default: the model config's; see fix_tunix_llama3_rope).
    spec_rollout_kwargs: passed through to er_jax.SpecRollout (e.g. kv_budget_bytes, calibration, layout).

    After each `update_params`, `update_times[-1]` holds {"map_s", "spec_update_s", "derive_s"} (also logged).
    After each `generate`, `last_stats` holds er_jax's rollout statistics (steps, γ per step, τ, ...).
    """

    def __init__(self, rollout_actor=None, tokenizer=None, mesh=None, rollout_config=None, *,
                 mode: str = "adaptive", drafter: str = "int4", draft_length: int = 5, er_mesh="tunix",
                 max_batch: int | None = None, max_prompt_len: int | None = None, max_new_tokens: int | None = None,
                 rope_theta: float | None = None, spec_rollout_kwargs: dict | None = None, **unknown):
        if unknown:
            raise ValueError(f"ErJaxRollout got unknown keyword(s) {sorted(unknown)}; SpecRollout options go in "
                             f"spec_rollout_kwargs={{...}}")
        if rollout_actor is None:
            raise ValueError("ErJaxRollout needs rollout_actor= (the tunix policy model; RLCluster passes it)")
        if tokenizer is None:
            raise ValueError("ErJaxRollout needs tokenizer= (RLCluster passes its TokenizerAdapter)")
        from tunix.generate import tokenizer_adapter
        if not isinstance(tokenizer, tokenizer_adapter.TokenizerAdapter):
            tokenizer = tokenizer_adapter.TokenizerAdapter(tokenizer)
        self._tokenizer = tokenizer
        rc = rollout_config or base_rollout.RolloutConfig()
        self._check_config(rc)
        self.family = model_family(rollout_actor)
        self._tunix_mesh = mesh
        self._defaults = rc
        eos = tuple(rc.eos_tokens) if rc.eos_tokens else (int(tokenizer.eos_id()),)
        dtype = rc.data_type
        self.config = er_config_from_tunix(rollout_actor, dtype=dtype, eos_ids=eos, pad_id=int(tokenizer.pad_id()),
                                           bos_id=tokenizer.bos_id() or None, rope_theta=rope_theta)
        tunix_theta = float(rollout_actor.config.rope_theta)
        if (self.family == "llama3" and _llama3_ignores_rope_theta()
                and self.config.rope_theta != TUNIX_ROPE_BASE):
            raise ValueError(
                f"tunix {getattr(tunix, '__version__', '0.1.7')}'s Llama 3 attention ignores config.rope_theta="
                f"{tunix_theta:g} and always rotates with base {TUNIX_ROPE_BASE:g}, so tunix's trainer and "
                f"er_jax's rollout (which uses {self.config.rope_theta:g}) would compute different models and the "
                f"rollout's log-probs would not be the trained policy's. Either call "
                f"er_jax.integrations.tunix.fix_tunix_llama3_rope() before building the models (recommended: "
                f"tunix then uses the configured base, as the weights' reference does), or pass "
                f"rope_theta={TUNIX_ROPE_BASE:g} to ErJaxRollout to reproduce tunix's model as it is")
        if mode not in MODES or drafter not in DRAFTERS:  # SpecRollout is built lazily: say it now
            raise ValueError(f"mode must be one of {MODES} and drafter one of {DRAFTERS}; got {mode!r}, {drafter!r}")
        self.mode, self.drafter, self.draft_length = mode, drafter, draft_length
        self.max_batch = max_batch
        self.max_prompt_len = int(max_prompt_len or rc.max_prompt_length)
        self.max_new_tokens = int(max_new_tokens or rc.max_tokens_to_generate)
        self._spec_kwargs = dict(spec_rollout_kwargs or {})
        for k in ("mode", "drafter", "draft_length", "mesh", "max_batch", "max_prompt_len", "max_new_tokens"):
            if k in self._spec_kwargs:
                raise ValueError(f"pass {k!r} to ErJaxRollout itself (er_mesh= for the mesh), not in "
                                 f"spec_rollout_kwargs")
        self.er_mesh = self._resolve_mesh(er_mesh, mesh, rc)
        self._flat: dict[str, Any] = {}
        self.weights = None  # er_jax's pytree (stacked layers), the one teacher-forced log-probs use
        self.spec: er_jax.SpecRollout | None = None
        self.update_times: list[dict] = []
        self.last_stats: dict | None = None
        self._logp_fns: dict[float, Callable] = {}
        self._warned_pad = False
        self.update_params(nnx.state(rollout_actor, nnx.Param))
        if max_batch is not None:
            self._build(int(max_batch))

    # -- configuration -------------------------------------------------------------------------------------
    @staticmethod
    def _check_config(rc) -> None:
        """Refuse RolloutConfig fields er_jax cannot honour (fields we translate are checked per call)."""
        default = base_rollout.RolloutConfig()
        for f in rc.__dataclass_fields__:
            if f.startswith(_OTHER_ENGINE_PREFIXES) and getattr(rc, f) != getattr(default, f):
                engine = "vLLM" if f.startswith("rollout_vllm_") else "SG-Lang JAX"
                raise ValueError(f"RolloutConfig.{f}={getattr(rc, f)!r} configures the {engine} engine, which "
                                 f"ErJaxRollout is not; leave it at its default ({getattr(default, f)!r}) or use "
                                 f"rollout_engine='{'vllm' if engine == 'vLLM' else 'sglang_jax'}'")
        if rc.rollout_mapping_config is not None:
            raise ValueError("RolloutConfig.rollout_mapping_config is for engines with their own model code; "
                             "ErJaxRollout maps tunix's Llama 3 / Qwen 2 parameters itself: leave it None")
        if rc.expert_parallel_size != 1:
            raise ValueError(f"RolloutConfig.expert_parallel_size={rc.expert_parallel_size}: er_jax runs dense "
                             f"models only (no experts); set it to 1")
        if rc.max_tokens_to_generate < 1:
            raise ValueError(f"RolloutConfig.max_tokens_to_generate must be >= 1, got {rc.max_tokens_to_generate}")

    def _resolve_mesh(self, er_mesh, tunix_mesh, rc):
        from jax.sharding import Mesh

        tp, dp = rc.tensor_parallel_size, rc.data_parallel_size
        if isinstance(er_mesh, str):
            if er_mesh != "tunix":
                raise ValueError(f"er_mesh must be 'tunix', None, an er_jax MeshConfig or a jax Mesh with axes "
                                 f"('data', 'model'); got {er_mesh!r}")
            if tunix_mesh is None or tunix_mesh.empty or tunix_mesh.size == 1:
                resolved = None
            else:
                names, shape = list(tunix_mesh.axis_names), dict(tunix_mesh.shape)
                data = [n for n in names if n in _DATA_AXES]
                model = [n for n in names if n in _MODEL_AXES]
                other = [n for n in names if n not in data + model and shape[n] > 1]
                if other:
                    raise ValueError(f"tunix's rollout mesh has axes {names} with sizes {shape}; er_jax maps "
                                     f"{_DATA_AXES} to data parallelism and {_MODEL_AXES} to tensor parallelism "
                                     f"and cannot place {other}. Pass er_mesh=MeshConfig(data, model) explicitly")
                order = [names.index(n) for n in data + model] + [names.index(n) for n in names
                                                                  if n not in data + model]
                devs = np.transpose(tunix_mesh.devices, order)
                nd = int(np.prod([shape[n] for n in data])) if data else 1
                nm = int(np.prod([shape[n] for n in model])) if model else 1
                resolved = Mesh(devs.reshape(nd, nm), ("data", "model"))
        else:
            resolved = er_mesh
        if resolved is not None and not isinstance(resolved, Mesh):
            from er_jax import sharding
            resolved = sharding.as_mesh(resolved)
        sizes = (1, 1) if resolved is None else (int(resolved.shape["data"]), int(resolved.shape["model"]))
        for name, want, have in (("tensor_parallel_size", tp, sizes[1]), ("data_parallel_size", dp, sizes[0])):
            if want not in (-1, None) and int(want) != have:
                raise ValueError(f"RolloutConfig.{name}={want} but the er_jax mesh has {have} on that axis "
                                 f"(data x model = {sizes[0]} x {sizes[1]}); pass "
                                 f"er_mesh=er_jax.sharding.MeshConfig(data=..., model=...) to match, or leave "
                                 f"{name}=-1")
        return resolved

    def _build(self, n_rows: int) -> None:
        t0 = time.perf_counter()
        self.spec = er_jax.SpecRollout(self.config, self.weights, None, max_batch=n_rows,
                                       max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens,
                                       drafter=self.drafter, mode=self.mode, draft_length=self.draft_length,
                                       mesh=self.er_mesh, **self._spec_kwargs)
        self.max_batch = n_rows
        if self.update_times:  # the weights mapped before the engine existed were handed to it (and derived) now
            self.update_times[-1].update(spec_update_s=time.perf_counter() - t0,
                                         derive_s=(getattr(self.spec, "derive_seconds", None) or [None])[-1])
        log.info("er_jax SpecRollout built (mode=%s drafter=%s max_batch=%d) in %.2f s", self.mode, self.drafter,
                 n_rows, time.perf_counter() - t0)

    # -- BaseRollout ---------------------------------------------------------------------------------------
    def update_params(self, params, filter_types=None) -> None:
        """Map the tunix policy's nnx.Param state onto er_jax's weights (jnp ops on the arrays' devices; tensors
        not in `params` keep their previous values, like tunix's vanilla engine) and re-derive the drafter."""
        if filter_types is not None:
            types = filter_types if isinstance(filter_types, (tuple, list)) else (filter_types,)
            bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nnx.Param))
                   or (isinstance(t, type) and issubclass(t, nnx.LoRAParam))]
            if bad:
                raise ValueError(f"update_params got filter_types={filter_types}: er_jax serves full weights and "
                                 f"has no LoRA adapters, so a LoRA-only sync cannot be applied. Merge the LoRA "
                                 f"weights into the base model (or train without LoRA) to use ErJaxRollout")
        t0 = time.perf_counter()
        self._flat.update(flatten_params(params))
        weights = jax.block_until_ready(weights_from_tunix(self.config, self._flat))
        t1 = time.perf_counter()
        self.weights = weights
        derive = None
        if self.spec is not None:
            # SpecRollout's checks (finiteness) read one flag per tensor back and make small constants; tunix's
            # sync_weights disallows every host transfer on CPU, so they run outside that guard. The weights
            # themselves were mapped above, under the caller's guard.
            with jax.transfer_guard("allow"):
                self.spec.update_params(weights)
            derive = (getattr(self.spec, "derive_seconds", None) or [None])[-1]
        t2 = time.perf_counter()
        rec = {"map_s": t1 - t0, "spec_update_s": t2 - t1 if self.spec is not None else None, "derive_s": derive}
        self.update_times.append(rec)
        log.info("er_jax update_params: mapped tunix weights in %.3f s, SpecRollout.update_params (validation + "
                 "drafter derivation) %s s", rec["map_s"], "n/a" if rec["spec_update_s"] is None
                 else f"{rec['spec_update_s']:.3f}")

    def generate(self, prompts, rollout_config=None, **kwargs) -> base_rollout.RolloutOutput:
        if kwargs:
            raise ValueError(f"ErJaxRollout.generate got unsupported keyword(s) {sorted(kwargs)}")
        rc = rollout_config or self._defaults
        self._check_config(rc)
        if rc.data_type is not None and _dtype_name(rc.data_type) != self.config.dtype:
            raise ValueError(f"RolloutConfig.data_type={jnp.dtype(rc.data_type).name} differs from the dtype this "
                             f"ErJaxRollout was built with ({self.config.dtype}); er_jax cannot switch per call")
        self._resolve_mesh(self.er_mesh if self.er_mesh is not None else None, None, rc)  # tp / dp agreement
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        max_new = int(rc.max_tokens_to_generate)
        if max_new > self.max_new_tokens:
            raise ValueError(f"max_tokens_to_generate={max_new} exceeds this ErJaxRollout's max_new_tokens="
                             f"{self.max_new_tokens}; pass max_new_tokens= (functools.partial) to allow it")
        ids = [self._tokenize(p) for p in prompts]
        longest = max(len(i) for i in ids)
        pad = int(self._tokenizer.pad_id())
        # tunix masks every prompt token equal to the pad id (its sampler and its trainer alike), so the policy
        # it trains never sees them: er_jax decodes from the same, masked, prompt (dropping a masked token is the
        # same computation).
        feed = [[t for t in p if t != pad] for p in ids]
        if any(len(f) != len(p) for f, p in zip(feed, ids)) and not self._warned_pad:
            self._warned_pad = True
            log.warning("prompts contain the pad id %d; tunix masks those tokens (sampler and trainer), and so does "
                        "ErJaxRollout. If they are real tokens (e.g. pad = <|im_end|> inside a chat template), give "
                        "the tokenizer a pad id that never occurs in text", pad)
        if any(not f for f in feed):
            raise ValueError(f"a prompt consists of pad tokens (id {pad}) only; tunix masks them, nothing is left")
        if max(len(f) for f in feed) > self.max_prompt_len:
            raise ValueError(f"a prompt has {max(len(f) for f in feed)} tokens, over this ErJaxRollout's "
                             f"max_prompt_len={self.max_prompt_len} (from RolloutConfig.max_prompt_length unless "
                             f"given); tunix's vanilla sampler would grow its buffers, er_jax sizes its KV cache up "
                             f"front: pass "
                             f"max_prompt_len= (functools.partial) or shorten the prompts")
        if self.spec is None:
            self._build(self.max_batch or len(ids))
        if len(ids) > self.max_batch:
            raise ValueError(f"{len(ids)} prompts exceed max_batch={self.max_batch} (the first call's size unless "
                             f"given); pass max_batch= (functools.partial) or a smaller rollout micro-batch")
        temperature, top_p, top_k, filtered = self._sampling(rc)
        eos = tuple(int(e) for e in rc.eos_tokens) if rc.eos_tokens else (int(self._tokenizer.eos_id()),)
        erc = er_jax.RolloutConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=_seed_int(rc.seed),
                                   max_new_tokens=max_new, eos_ids=eos)
        out = self.spec.generate(feed, erc)
        self.last_stats = out.stats
        eos_set = set(eos)
        tokens = []
        for i in range(len(ids)):
            t = np.asarray(out.tokens[i, : int(out.lengths[i])], np.int32)
            if len(t) and int(t[-1]) in eos_set:  # tunix returns the tokens before the first EOS
                t = t[:-1]
            tokens.append(t)
        width = max(int(rc.max_prompt_length), longest)
        if longest > rc.max_prompt_length:  # tunix's sampler pads to the next power of two then
            width = 1 << (longest - 1).bit_length()
        left = np.full((len(ids), width), pad, np.int32)
        for i, p in enumerate(ids):
            left[i, width - len(p):] = p
        logprobs = None
        if rc.return_logprobs:
            if filtered:  # er_jax reports the filtered law's log-probs; tunix's convention is the full softmax
                logprobs = self._rows_logps(left, tokens, temperature, pad)
            else:
                logprobs = [np.asarray(out.logprobs[i, : len(t)], np.float32) for i, t in enumerate(tokens)]
        text = [self._tokenizer.decode(t.tolist()) for t in tokens]
        return base_rollout.RolloutOutput(text=text, logits=[], tokens=tokens, left_padded_prompt_tokens=left,
                                          logprobs=logprobs)

    def get_per_token_logps(self, prompt_tokens, completion_tokens, temperature: float | None = None):
        """Teacher-forced log-probs of `completion_tokens` [B, C] after left-padded `prompt_tokens` [B, P], as tunix
        computes them (pad tokens masked; log-softmax of logits / temperature over the whole vocabulary).

        temperature: default the rollout config's (what tunix's GRPO loss uses for the new policy's log-probs, so
        the PPO ratio starts at exactly 1; tunix's vanilla engine computes these at temperature 1)."""
        t = float(self._defaults.temperature if temperature is None else temperature)
        if self._defaults.top_p is None and temperature is None:
            t = 0.0  # greedy rollouts: raw logits, like tunix
        p, c = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(completion_tokens, jnp.int32)
        if p.ndim != 2 or c.ndim != 2 or p.shape[0] != c.shape[0]:
            raise ValueError(f"prompt_tokens {p.shape} and completion_tokens {c.shape} must be [B, P] and [B, C]")
        return self._logp_fn(t)(self.weights, p, c)

    def pad_id(self) -> int:
        return int(self._tokenizer.pad_id())

    def eos_id(self) -> int:
        return int(self._tokenizer.eos_id())

    def model(self):
        """None: er_jax holds its own copy of the weights, not a tunix nnx model (so tunix syncs weights every
        step; `self.weights` is the er_jax pytree)."""
        return None

    # -- helpers -------------------------------------------------------------------------------------------
    def _tokenize(self, prompt) -> list[int]:
        """As tunix's sampler does: encode, put the BOS in front when the tokenizer has one, drop doubled BOS."""
        if not isinstance(prompt, str) and np.asarray(prompt).dtype.kind in "USO" and np.size(prompt) == 1:
            prompt = str(np.asarray(prompt).reshape(-1)[0])  # tunix batches strings as numpy arrays
        if isinstance(prompt, str):
            ids = list(self._tokenizer.encode(prompt))
            bos = self._tokenizer.bos_id()
            ids = self._tokenizer.dedup_bos_ids(([bos] if bos else []) + ids)
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError("a prompt tokenized to no tokens; every prompt needs at least one")
        return [int(t) for t in ids]

    def _sampling(self, rc):
        """tunix's rule: top_p None -> greedy (so is temperature 0, as RolloutConfig documents); else temperature,
        top-k (None / <= 0: off) then top-p on what is left. Returns (temperature, top_p, top_k, filtered)."""
        if rc.top_p is None or rc.temperature == 0:
            return 0.0, 1.0, None, False
        if not rc.temperature > 0:
            raise ValueError(f"RolloutConfig.temperature must be >= 0 (0: greedy), got {rc.temperature}")
        if not rc.top_p > 0:
            raise ValueError(f"RolloutConfig.top_p must be in (0, 1] (None: greedy), got {rc.top_p}")
        top_p = min(float(rc.top_p), 1.0)
        top_k = int(rc.top_k) if rc.top_k is not None and int(rc.top_k) > 0 else None
        if top_k is not None and top_k >= self.config.vocab_size:
            top_k = None
        return float(rc.temperature), top_p, top_k, top_p < 1.0 or top_k is not None

    def _logp_fn(self, temperature: float):
        if temperature not in self._logp_fns:
            self._logp_fns[temperature] = jax.jit(functools.partial(_teacher_forced_logps, self.config,
                                                                    self.pad_id(), temperature))
        return self._logp_fns[temperature]

    def _rows_logps(self, left, tokens, temperature, pad) -> list[np.ndarray]:
        width = max(max((len(t) for t in tokens), default=1), 1)
        comp = np.full((len(tokens), width), pad, np.int32)
        for i, t in enumerate(tokens):
            comp[i, : len(t)] = t
        lp = np.asarray(self.get_per_token_logps(left, comp, temperature=temperature))
        return [lp[i, : len(t)].astype(np.float32) for i, t in enumerate(tokens)]
