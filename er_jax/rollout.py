"""SpecRollout: the object an RL loop holds (names follow google/tunix's rollout interface)."""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from er_jax import controller, sharding
from er_jax.config import DRAFTER_HEADS, MODES, SCHEMES, ModelConfig, RolloutConfig, check_choice
from er_jax.engine import MAX_DRAFT, Engine, RolloutOutput
from er_jax.execution import resolve_execution
from er_jax.model import drafter_layout, execution_layout, forward, validate_weights
from er_jax.quant import drafter_bytes
from er_jax.sampling import reported_log_probs, token_logprob


# The drafter's LM head by default (issue 12, deliverable 5; the numbers: experiments/results/
# acceptance_head_smollm2.json and docs/cpu_profile.md).
DEFAULT_DRAFTER_HEAD = "int8"


def _with_drafter_head(costs, config: ModelConfig, head: str):
    """The cost model's drafter bytes with the drafter's own int8 head in place of the shared one."""
    if head == "shared":
        return costs
    from er_jax.controller.costs import ITEMSIZE, quantized_bytes

    d, v = config.hidden_size, config.vocab_size
    return dataclasses.replace(costs, drafter_bytes=costs.drafter_bytes - d * v * ITEMSIZE[config.dtype]
                               + quantized_bytes(d, v, "int8"))


class SpecRollout:
    """Self-speculative rollouts of a policy.

    mode: "ar" (plain decode), "sd" (always speculate with `draft_length`), "toggle" (the paper's
    roofline toggle, fixed γ), "adaptive" (toggle + γ ladder: the paper's full method), "auto" (per-step
    argmin of predicted time per emitted token over γ in {0} + ladder).
    policy: a controller.Policy to use instead of the one `mode` names (e.g. `controller.make_policy("auto",
    ..., ladder=(3, 5))`); its mode is then the rollout's. `generate(..., policy=)` and `warmup(..., policy=)`
    take one per call (a benchmark running every mode on one SpecRollout); `self.policy` is read-only.
    forced_acceptance: benchmarks of random-weight models only; see `Engine` (output is not lossless).
    """

    def __init__(self, config: ModelConfig, weights, tokenizer=None, *, max_batch: int, max_prompt_len: int,
                 max_new_tokens: int, drafter: str = "int4", mode: str = "ar", draft_length: int = 5,
                 kernels: str | None = None, kv_budget_bytes: int | None = None, calibration=None,
                 seed: int = 0, mesh=None, layout: str | None = None, forced_acceptance: float | None = None,
                 drafter_head: str = DEFAULT_DRAFTER_HEAD,
                 policy: controller.Policy | None = None):
        if policy is not None:
            mode = policy.mode
        check_choice("mode", mode, MODES)
        check_choice("drafter", drafter, SCHEMES)
        check_choice("drafter_head", drafter_head, DRAFTER_HEADS)
        if not 1 <= draft_length <= MAX_DRAFT:
            raise ValueError(f"draft_length must be in [1, {MAX_DRAFT}], got {draft_length}")
        self.config = config
        self.tokenizer = tokenizer
        # mesh: a sharding.MeshConfig (data, model), a jax Mesh with axes ("data", "model"), or None.
        self.mesh = sharding.as_mesh(mesh)
        if self.mesh is not None:
            sharding.check_mesh(config, self.mesh, drafter if mode != "ar" else None)
        self.mode = mode
        self.drafter_scheme = drafter
        self.drafter_head = drafter_head  # "shared" (the target's LM head) or "int8" (the drafter's own)
        # kernels: the op backend (config.BACKENDS); layout: "stacked" (scanned; fast compiles) or "unstacked"
        # (per-layer arrays); None: the platform's defaults (er_jax.execution.resolve_execution).
        self.ex = resolve_execution(kernels, self.mesh, layout)
        self.kernels, self.layout = self.ex.backend, self.ex.layout
        self.costs = _with_drafter_head(controller.ModelCosts.from_config(config, drafter), config, drafter_head)
        self._policy = policy or controller.make_policy(mode, self.costs, draft_length=draft_length,
                                                        calibration=calibration, seed=seed, backend=self.kernels)
        self._logps = jax.jit(functools.partial(_teacher_forced_logps, config, self.ex), static_argnums=(3, 4))
        self.engine = Engine(config, max_batch=max_batch, max_prompt_len=max_prompt_len,
                             max_new_tokens=max_new_tokens, ex=self.ex,
                             kv_budget_bytes=kv_budget_bytes, forced_acceptance=forced_acceptance)
        self.weights = None
        self.drafter = None
        self.drafter_bytes = 0
        self.derive_seconds: list[float] = []  # per update_params: the drafter's derivation (and its layout)
        self.layout_seconds: list[float] = []  # per update_params: the target's execution layout (e.g. packing)
        self.update_params(weights)

    # -- tunix-shaped interface --------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def eos_id(self) -> int | None:
        return self.config.eos_ids[0] if self.config.eos_ids else None

    @property
    def policy(self) -> controller.Policy:
        """The policy `mode` (or the constructor's `policy=`) chose; pass another to generate / warmup."""
        return self._policy

    @property
    def speculates(self) -> bool:
        return _speculates(self.policy)

    def update_params(self, weights) -> None:
        """Swap in new policy weights (no recompile) and re-derive the drafter from them."""
        validate_weights(self.config, weights, "update_params: weights")
        if not bool(_all_finite(weights)):  # one reduction, one host sync; name the leaves only on failure
            bad = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(weights)
                   if not bool(jnp.isfinite(a).all())]
            raise ValueError(f"update_params: non-finite values (NaN/inf) in {bad}; refusing these weights")
        dt = self.config.jnp_dtype
        weights = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dt), weights)
        if self.mesh is not None:
            weights = sharding.shard_weights(weights, self.mesh)
        t0 = time.perf_counter()
        self.weights = jax.block_until_ready(execution_layout(weights, self.ex))
        self.layout_seconds.append(time.perf_counter() - t0)
        if self.speculates:
            if not self.drafter_bytes:  # shapes are fixed (validate_weights): compute it once
                self.drafter_bytes = drafter_bytes(weights, self.drafter_scheme, head=self.drafter_head)
            t0 = time.perf_counter()
            drafter = drafter_layout(weights, self.ex, self.drafter_scheme, self.drafter_head,
                                     self.weights.get("lm_head_p"))
            drafter["embed"] = self.weights["embed"]  # shared with the target in its layout too (not a 2nd copy)
            self.drafter = jax.block_until_ready(drafter)
            self.derive_seconds.append(time.perf_counter() - t0)

    def _policy_for(self, policy: controller.Policy | None) -> controller.Policy:
        """`policy` (or the rollout's own); a speculating one needs the drafter a speculating mode derives."""
        policy = policy or self.policy
        if _speculates(policy) and self.drafter is None:
            raise ValueError(f"a {policy.mode!r} policy speculates, but this SpecRollout (mode {self.mode!r}) derived "
                             f"no drafter; create it with a speculating mode (or policy=)")
        return policy

    def generate(self, prompts: Sequence, rollout_config: RolloutConfig | None = None, *,
                 min_new_tokens: Sequence[int] | None = None, max_new_tokens: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None, trace_path: str | None = None,
                 policy: controller.Policy | None = None) -> RolloutOutput:
        """Sample completions. prompts: strings (tokenized; chat template when the config asks) or token
        id lists. `min_new_tokens` (per row) suppresses EOS before that many tokens (benchmarks);
        `max_new_tokens` (per row, each <= the rollout config's limit) ends each row at its own length.
        `trace_path` appends one JSON line per engine step (a controller.StepRecord's to_dict: time, bucket, rows,
        context, γ, tokens, acceptance, intensity). `policy`: this call's policy (default: the rollout's own)."""
        rc = rollout_config or RolloutConfig()
        policy = self._policy_for(policy)
        token_prompts = self._prompt_tokens(prompts, rc)
        max_new = rc.max_new_tokens or self.engine.max_new_tokens
        if max_new > self.engine.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new} exceeds this SpecRollout's max_new_tokens="
                             f"{self.engine.max_new_tokens}; create it with a larger max_new_tokens")
        n = len(token_prompts)
        min_new = np.zeros(n, np.int32) if min_new_tokens is None else np.asarray(min_new_tokens, np.int32)
        if min_new.shape != (n,) or (min_new < 0).any() or (min_new > max_new).any():
            raise ValueError(f"min_new_tokens must be {n} integers in [0, {max_new}], got {min_new_tokens}")
        limit = np.full(n, max_new, np.int32) if max_new_tokens is None else np.asarray(max_new_tokens, np.int32)
        if limit.shape != (n,) or (limit < 1).any() or (limit > max_new).any() or (min_new > limit).any():
            raise ValueError(f"max_new_tokens must be {n} integers in [max(1, min_new_tokens), {max_new}], "
                             f"got {max_new_tokens}")
        eos = self.config.eos_ids if rc.eos_ids is None else rc.eos_ids
        trace_file = open(trace_path, "a") if trace_path else None
        try:
            out = self.engine.run(self.weights, self.drafter, token_prompts, rc.sampling, seed=rc.seed,
                                  eos_ids=eos, max_new=limit, min_new=min_new,
                                  policy=policy, costs=self.costs, pad_id=self.pad_id, progress=progress,
                                  trace=trace_file and (lambda rec: trace_file.write(json.dumps(rec.to_dict()) + "\n")))
        finally:
            if trace_file:
                trace_file.close()
        out.stats.update(mode=policy.mode, kernels=self.kernels, kv_cache_bytes=self.engine.kv_bytes,
                         drafter_bytes=self.drafter_bytes, compile_count=self.engine.compile_count,
                         drafter_derive_s=self.derive_seconds[-1] if self.derive_seconds else None,
                         weights_layout_s=self.layout_seconds[-1] if self.layout_seconds else None,
                         forced_acceptance=self.engine.forced_acceptance)
        return out

    def warmup(self, rollout_config: RolloutConfig | None = None, prompt_lens=None,
               policy: controller.Policy | None = None, group_size: int = 1, prompts=None) -> int:
        """Pre-compile every (batch bucket, γ) step the policy (default: the rollout's own) may choose, every
        compaction, and prefill for the prompt buckets of `prompt_lens` (default: max_prompt_len) with
        `group_size` rows per distinct prompt (GRPO's G: identical prompts are prefilled once). `prompts`
        (token id lists, as `generate` takes them): also the prefill of exactly these, whose shared opening
        is fed once (`engine.shared_prefix`); their lengths are then the default `prompt_lens`. Returns the
        executables added."""
        rc = rollout_config or RolloutConfig()
        policy = self._policy_for(policy)
        eos = self.config.eos_ids if rc.eos_ids is None else rc.eos_ids
        tokens = None if prompts is None else self._prompt_tokens(prompts, rc)
        return self.engine.warmup(self.weights, self.drafter, policy.gammas(), rc.sampling, eos, prompt_lens,
                                  group_size, tokens)

    def get_per_token_logps(self, prompt_tokens, completion_tokens, temperature: float = 1.0,
                            top_k: int | None = None, top_p: float = 1.0):
        """Teacher-forced log-probs of `completion_tokens` given `prompt_tokens` (one row or a batch of
        equal-length rows), under the same processing the sampler used. Returns f32 [B, C]."""
        p = np.atleast_2d(np.asarray(prompt_tokens, np.int32))
        c = np.atleast_2d(np.asarray(completion_tokens, np.int32))
        if p.shape[0] != c.shape[0] or p.shape[1] < 1 or c.shape[1] < 1:
            raise ValueError(f"prompt {p.shape} and completion {c.shape} must be non-empty with equal batch")
        self._check_ids(np.concatenate([p, c], 1))
        sc = RolloutConfig(temperature=temperature, top_k=top_k, top_p=top_p).sampling
        seq = jnp.asarray(np.concatenate([p, c], axis=1))
        return np.asarray(self._logps(self.weights, seq, jnp.asarray(c), p.shape[1], sc))

    # -- sizes, compile cache --------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return self.engine.kv_bytes

    @property
    def compile_count(self) -> int:
        return self.engine.compile_count

    # -- validation ----------------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token id {int(ids.min() if ids.min() < 0 else ids.max())} is outside the "
                             f"vocabulary [0, {self.config.vocab_size})")

    def _prompt_tokens(self, prompts, rc: RolloutConfig) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
            raise ValueError("prompts must be a list of strings or of token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; pass at least one prompt")
        if len(prompts) > self.engine.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch={self.engine.max_batch}; split them or "
                             f"create the SpecRollout with a larger max_batch")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass tokenizer= or token ids")
                p = (self.tokenizer.chat([{"role": "user", "content": p}]) if rc.apply_chat_template
                     else self.tokenizer.encode(p))
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
            if not ids:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(ids) > self.engine.max_prompt_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, over max_prompt_len="
                                 f"{self.engine.max_prompt_len}; shorten it or raise max_prompt_len")
            self._check_ids(np.asarray(ids))
            out.append(ids)
        return out


def _teacher_forced_logps(config: ModelConfig, ex, weights, seq, completion, prompt_len: int, sampling):
    """Log-probs of `completion` (the last C tokens of `seq`) under the sampler's processing (jitted), by the
    rollout's own kernels (`ex`): in bf16, XLA's fused reference keeps f32 between some ops where the native
    ops round to bf16 (docs/internals.md, "Teacher-forced log-probs")."""
    logits = forward(config, weights, seq, ex=ex)[:, prompt_len - 1: -1]
    return token_logprob(reported_log_probs(logits, sampling), completion)


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(a).all() for a in jax.tree_util.tree_leaves(tree)]))


def _speculates(policy) -> bool:
    return any(g > 0 for g in policy.gammas())
