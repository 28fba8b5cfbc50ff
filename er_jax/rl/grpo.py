"""GRPO on top of SpecRollout: flax TrainState + optax, group-normalized advantages, a clipped policy ratio
against the rollout's own log-probs, an optional k3 KL to a frozen reference, per-token masking past each
row's length, and Orbax checkpoints that resume bit-for-bit.

One training step:
  1. take `prompts_per_step` examples from the task at the data position, repeat each `samples` (G) times;
  2. `rollout.generate` -> tokens, lengths, target log-probs (the "old" log-probs of the PPO ratio);
  3. rewards from the task; advantages normalized within each group of G;
  4. `updates_per_rollout` optimizer steps on the GRPO loss (teacher-forced `forward` of prompt + completion,
     the same temperature / top-k / top-p processing the sampler used: `sampling.reported_log_probs`);
  5. `rollout.update_params(new params)`: validates them (refuses NaN/inf or wrong shapes, in which case the
     step is not committed) and re-derives the drafter.
On the first update a run makes, the trainer's recomputed log-probs must equal the rollout's to
`fidelity_atol` (1e-4 in f32) over every unmasked token, or the step raises `FidelityError`.

Determinism: example i of the task, the rollout seed of step s (`rollout_seed(seed, s)`) and every jitted
computation are fixed functions of (seed, step, weights, optimizer state, controller state), and the
checkpoint holds all of these, so a run resumed from a checkpoint produces the same tokens, rewards and
losses as an uninterrupted one. The exception is mode "auto": its online calibrator picks γ from measured
wall times, and which γ runs changes which (equally distributed) tokens are drawn.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from er_jax import sharding
from er_jax.config import ModelConfig, RolloutConfig, SamplingConfig
from er_jax.model import forward
from er_jax.rollout import SpecRollout
from er_jax.sampling import reported_log_probs, token_logprob

LOSS_AGGS = ("seq-mean-token-mean", "token-mean")


class FidelityError(AssertionError):
    """The rollout's log-probs differ from the trainer's teacher-forced recomputation."""


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 4
    samples: int = 4  # G: completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2  # ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # None: clip_eps
    kl_coef: float = 0.0  # β of the k3 KL to the frozen initial policy (0: no reference model)
    updates_per_rollout: int = 1  # μ: optimizer steps per rollout batch
    micro_batch: int | None = None  # rows per gradient chunk (None: the whole batch at once)
    loss_agg: str = "seq-mean-token-mean"
    adv_eps: float = 1e-4
    seed: int = 0
    sampling_seed: int | None = None  # seed of the rollout streams only (None: seed); prompts and init unchanged
    mode: str = "adaptive"
    draft_length: int = 5
    drafter: str = "int4"
    save_every: int = 0  # checkpoint every N steps (0: only when asked)
    keep_checkpoints: int = 2
    fidelity_check: str = "first"  # "first" (first update of a run), "every" or "off"
    fidelity_atol: float = 1e-4

    def __post_init__(self):
        for f in ("prompts_per_step", "max_new_tokens", "updates_per_rollout"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.samples < 2:
            raise ValueError(f"samples (G) must be >= 2 for group-normalized advantages, got {self.samples}")
        if not (self.lr >= 0 and self.max_grad_norm > 0 and self.clip_eps > 0 and self.kl_coef >= 0):
            raise ValueError("need lr >= 0, max_grad_norm > 0, clip_eps > 0 and kl_coef >= 0")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.rows % self.micro_batch):
            raise ValueError(f"micro_batch must divide prompts_per_step * samples = {self.rows}, "
                             f"got {self.micro_batch}")
        if self.fidelity_check not in ("first", "every", "off"):
            raise ValueError(f"fidelity_check must be 'first', 'every' or 'off', got {self.fidelity_check!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        self.sampling  # validates temperature / top-k / top-p

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested with hand-computed values)
# ---------------------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - mean_group) / (std_group + eps) for rows laid out group by group ([g0 x G, g1 x G, ...]).

    std is the sample standard deviation (ddof = 1, as in tunix / TRL); a group whose rewards are all equal
    gets zero advantages."""
    r = np.asarray(rewards, np.float64)
    if group_size < 2 or r.ndim != 1 or r.size % group_size:
        raise ValueError(f"need a 1-D reward vector whose length is a multiple of group_size >= 2, got "
                         f"{r.shape} and {group_size}")
    g = r.reshape(-1, group_size)
    centered = g - g.mean(1, keepdims=True)
    std = g.std(1, ddof=1, keepdims=True)
    adv = np.where(std > 0, centered / np.where(std > 0, std + eps, 1.0), 0.0)
    return adv.reshape(-1).astype(np.float32)


def completion_mask(lengths, width: int):
    """bool [B, width]: True for the first lengths[b] positions (the EOS token included, pads excluded)."""
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def row_weights(mask, agg: str = "seq-mean-token-mean"):
    """Per-row weight w_b so that the loss is Σ_b w_b Σ_t m_bt l_bt.
    "seq-mean-token-mean": mean over rows of each row's token mean (w_b = 1 / (B n_b));
    "token-mean": mean over all unmasked tokens of the batch (w_b = 1 / Σ n)."""
    n = np.asarray(mask).sum(1).astype(np.float64)
    if agg == "seq-mean-token-mean":
        w = 1.0 / (len(n) * np.maximum(n, 1.0))
    elif agg == "token-mean":
        w = np.full(len(n), 1.0 / max(n.sum(), 1.0))
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {agg!r}")
    return w.astype(np.float32)


def grpo_token_terms(logp, old_logp, adv, ref_logp=None, clip_eps: float = 0.2, clip_eps_high: float | None = None):
    """Per-token (surrogate objective, k3 KL, clipped?) for log-probs [B, T], old log-probs [B, T] and
    advantages [B]. objective = min(ρ A, clip(ρ, 1-ε, 1+ε_high) A), ρ = exp(logp - old_logp);
    kl = exp(ref - logp) - (ref - logp) - 1 (zero without a reference)."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    a = adv[:, None]
    ratio = jnp.exp(logp - old_logp)
    s1 = ratio * a
    s2 = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi) * a
    obj = jnp.minimum(s1, s2)
    clipped = s2 < s1
    if ref_logp is None:
        kl = jnp.zeros_like(logp)
    else:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
    return obj, kl, clipped


def grpo_loss(logp, old_logp, adv, mask, weights, ref_logp=None, *, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, kl_coef: float = 0.0):
    """loss = Σ_b w_b Σ_t m_bt (-objective_bt + β kl_bt). Returns (loss, sums) with sums of the objective,
    the KL, clipped tokens and tokens over unmasked positions (they add up across micro-batches)."""
    m = mask.astype(jnp.float32)
    # Masked positions may hold -inf (a pad outside top-p); neutralize them before they meet a gradient.
    logp = jnp.where(mask, logp, old_logp)
    if ref_logp is not None:
        ref_logp = jnp.where(mask, ref_logp, logp)
    obj, kl, clipped = grpo_token_terms(logp, old_logp, adv, ref_logp, clip_eps, clip_eps_high)
    per_token = -obj + kl_coef * kl
    loss = jnp.sum(weights[:, None] * m * per_token)
    sums = dict(objective=jnp.sum(weights[:, None] * m * obj), kl=jnp.sum(m * kl),
                clipped=jnp.sum(m * clipped), tokens=jnp.sum(m))
    return loss, sums


def pack_sequences(prompts, tokens, lengths, total_len: int, pad_id: int):
    """Right-padded [prompt, completion] rows int32 [B, total_len] and the index int32 [B, W] of the position
    whose logits predict completion token t (prompt_len - 1 + t)."""
    tokens = np.asarray(tokens)
    b, width = tokens.shape
    seq = np.full((b, total_len), pad_id, np.int32)
    index = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int32)
        if len(p) + width > total_len:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + {width} new tokens exceed the training length "
                             f"{total_len}")
        n = int(lengths[i])
        seq[i, : len(p)] = p
        seq[i, len(p): len(p) + n] = tokens[i, :n]
        index[i] = len(p) - 1 + np.arange(width)
    return seq, index


def sequence_logps(config: ModelConfig, params, seq, index, completion, sampling: SamplingConfig):
    """Teacher-forced log-probs f32 [B, W] of `completion` under the sampler's processing."""
    logits = forward(config, params, seq, logit_index=index)
    return token_logprob(reported_log_probs(logits, sampling), completion)


def rollout_seed(seed: int, step: int) -> int:
    """The rollout seed of training step `step` (a fixed function, so resumed runs draw the same streams)."""
    return int((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2**31 - 1))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------------------
def _grad_chunk(config, sampling, clip_eps, clip_eps_high, kl_coef, params, batch, ref_logp):
    def loss_fn(p):
        logp = sequence_logps(config, p, batch["seq"], batch["index"], batch["completion"], sampling)
        loss, sums = grpo_loss(logp, batch["old_logp"], batch["adv"], batch["mask"], batch["weights"], ref_logp,
                               clip_eps=clip_eps, clip_eps_high=clip_eps_high, kl_coef=kl_coef)
        return loss, (sums, logp)

    (loss, (sums, logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, sums, logp, grads


def _ref_chunk(config, sampling, params, batch):
    return sequence_logps(config, params, batch["seq"], batch["index"], batch["completion"], sampling)


def _apply(state, grads):
    return state.apply_gradients(grads=grads), optax.tree.norm(grads)


_apply_jit = jax.jit(_apply)  # not donated: a refused update keeps the old state


@functools.lru_cache(maxsize=16)
def _train_fns(config, sampling, clip_eps, clip_eps_high, kl_coef):
    """The jitted gradient and reference functions, shared by every trainer with the same statics (so trainers
    of several modes, or a resumed one, compile them once)."""
    grad = jax.jit(functools.partial(_grad_chunk, config, sampling, clip_eps, clip_eps_high, kl_coef))
    ref = jax.jit(functools.partial(_ref_chunk, config, sampling))
    return grad, ref


def _mesh_train_fns(config, sampling, clip_eps, clip_eps_high, kl_coef, mesh, param_shardings, state_shardings):
    """The gradient, reference and update functions of a trainer on a mesh, their outputs pinned: gradients
    and the new state placed like the params (the optimizer state like its params), log-probs split over
    "data", scalars replicated. XLA partitions the rest (the data-parallel all-reduce of the gradients)."""
    rep, rows = sharding.replicated(mesh), sharding.rows_sharding(mesh)
    grad = jax.jit(functools.partial(_grad_chunk, config, sampling, clip_eps, clip_eps_high, kl_coef),
                   out_shardings=(rep, rep, rows, param_shardings))
    ref = jax.jit(functools.partial(_ref_chunk, config, sampling), out_shardings=rows)
    apply = jax.jit(_apply, out_shardings=(state_shardings, rep))
    return grad, ref, apply


def check_data_parallel(cfg: GRPOConfig, data: int) -> None:
    """Every training (micro-)batch is split evenly over the "data" axis, or refused here."""
    for name, rows in (("prompts_per_step * samples", cfg.rows), ("micro_batch", cfg.micro_batch)):
        if rows is not None and rows % data:
            raise ValueError(f"{name} = {rows} is not divisible by the mesh's data axis ({data}); pick a data "
                             f"axis that divides it or change --prompts-per-step / --samples / --micro-batch")


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    """AdamW behind global-norm gradient clipping."""
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------
class Trainer:
    """GRPO with a SpecRollout engine. `step()` runs one rollout + update and returns its metrics;
    `save()` / `restore()` checkpoint everything a bit-exact resume needs (Orbax, in `ckpt_dir`).

    mesh: a sharding.MeshConfig, a jax Mesh with axes ("data", "model"), or None (one device). On a mesh the
    rollout runs sharded, the params (and the reference) are tensor-parallel over "model" as
    `sharding.shard_weights` places them, the optimizer state is placed like its params, and each training
    (micro-)batch is split over "data": the jitted steps are the same, XLA partitions them. A checkpoint
    restores onto any mesh shape (or none)."""

    def __init__(self, config: ModelConfig, params, task, cfg: GRPOConfig, *, tokenizer=None,
                 ckpt_dir: str | None = None, calibration=None, kernels: str | None = None,
                 layout: str | None = None, reference_params=None, mesh=None):
        self.config, self.task, self.cfg, self.tokenizer = config, task, cfg, tokenizer
        if isinstance(mesh, sharding.MeshConfig):
            check_data_parallel(cfg, mesh.data)  # before asking for the devices
        self.mesh = sharding.as_mesh(mesh)
        if self.mesh is not None:
            check_data_parallel(cfg, int(self.mesh.shape["data"]))
            sharding.check_mesh(config, self.mesh, cfg.drafter if cfg.mode != "ar" else None)
        self.max_prompt_len = int(task.max_prompt_len)
        if self.max_prompt_len < 1:
            raise ValueError("the task must declare max_prompt_len >= 1")
        self.total_len = -(-(self.max_prompt_len + cfg.max_new_tokens) // 16) * 16
        self.rollout = SpecRollout(config, params, tokenizer, max_batch=cfg.rows, max_prompt_len=self.max_prompt_len,
                                   max_new_tokens=cfg.max_new_tokens, drafter=cfg.drafter, mode=cfg.mode,
                                   draft_length=cfg.draft_length, kernels=kernels, calibration=calibration,
                                   seed=cfg.seed, layout=layout, mesh=self.mesh)
        self.rollout_config = RolloutConfig(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                            max_new_tokens=cfg.max_new_tokens)
        params = self._place(self._cast(params))  # validated by the rollout; the trainer keeps the stacked layout
        self.state = self._new_state(params, functools.partial(forward, config), make_optimizer(cfg))
        self.reference = (self._place(reference_params if reference_params is not None else params)
                          if cfg.kl_coef > 0 else None)
        self.step_count = 0  # training steps done
        self.data_pos = 0  # index of the next task example
        self.updates_done_here = 0  # optimizer updates made by this process (the fidelity check's "first")
        self.fidelity: list[float] = []
        if self.mesh is None:
            self._grad, self._ref = _train_fns(config, cfg.sampling, cfg.clip_eps, cfg.clip_eps_high, cfg.kl_coef)
            self._apply = _apply_jit
        else:
            shardings = lambda tree: jax.tree_util.tree_map(lambda a: a.sharding, tree)
            self._grad, self._ref, self._apply = _mesh_train_fns(
                config, cfg.sampling, cfg.clip_eps, cfg.clip_eps_high, cfg.kl_coef, self.mesh,
                shardings(self.state.params), shardings(self.state))
        self.ckpt_dir = os.path.abspath(ckpt_dir) if ckpt_dir else None
        self._manager = None

    # -- one step ------------------------------------------------------------------------------------
    def _batch(self, examples, out, rewards):
        cfg = self.cfg
        prompts = [e.prompt for e in examples]
        width = out.tokens.shape[1]
        seq, index = pack_sequences(prompts, out.tokens, out.lengths, self.total_len, self.config.pad_id)
        mask = completion_mask(out.lengths, width)
        adv = group_advantages(rewards, cfg.samples, cfg.adv_eps)
        return dict(seq=seq, index=index, completion=np.asarray(out.tokens, np.int32), mask=mask,
                    old_logp=np.asarray(out.logprobs, np.float32), adv=adv,
                    weights=row_weights(mask, cfg.loss_agg))

    def _chunks(self, batch):
        mb = self.cfg.micro_batch or self.cfg.rows
        put = jnp.asarray if self.mesh is None else functools.partial(sharding.shard_rows, mesh=self.mesh)
        for s in range(0, self.cfg.rows, mb):
            yield {k: put(v[s: s + mb]) for k, v in batch.items()}

    def step(self, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """One GRPO step. Returns its metrics (also the step's index as "step"). A step that raises commits
        nothing: weights, optimizer, controller state, step count and data position stay as they were."""
        controller_state = self.rollout.policy.state_dict()
        try:
            return self._step(progress)
        except BaseException:
            self.rollout.policy.load_state_dict(controller_state)  # forget the failed step's rollout
            raise

    def _step(self, progress):
        cfg = self.cfg
        t0 = time.perf_counter()
        base = self.task.examples(self.data_pos, cfg.prompts_per_step)
        examples = [e for e in base for _ in range(cfg.samples)]
        seed = cfg.seed if cfg.sampling_seed is None else cfg.sampling_seed
        rc = dataclasses.replace(self.rollout_config, seed=rollout_seed(seed, self.step_count))
        out = self.rollout.generate([list(e.prompt) for e in examples], rc, progress=progress)
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        rewards = self.task.rewards(out.tokens, out.lengths, examples)
        if not np.isfinite(rewards).all():
            raise ValueError(f"step {self.step_count}: the task returned non-finite rewards "
                             f"{rewards[~np.isfinite(rewards)][:4].tolist()}; fix the reward function")
        batch = self._batch(examples, out, rewards)
        chunks = list(self._chunks(batch))
        refs = [self._ref(self.reference, c) for c in chunks] if self.reference is not None else [None] * len(chunks)
        state = self.state
        sums_total, losses, grad_norms, max_diff = {}, [], [], None
        for u in range(cfg.updates_per_rollout):
            grads, loss, logps = None, 0.0, []
            for c, ref in zip(chunks, refs):
                l, sums, logp, g = self._grad(state.params, c, ref)
                grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
                loss = loss + l
                logps.append(logp)
                if u == 0:
                    for k, v in sums.items():
                        sums_total[k] = sums_total.get(k, 0.0) + v
            if u == 0:  # logps under the rollout's own weights: the fidelity check
                logp = np.concatenate([np.asarray(x) for x in sharding.to_host(logps)])
                max_diff = float(np.max(np.abs(np.where(batch["mask"], logp - batch["old_logp"], 0.0)),
                                        initial=0.0))
                self._check_fidelity(max_diff)
            state, gn = self._apply(state, grads)
            losses.append(float(loss))
            grad_norms.append(float(gn))
        try:  # validates (NaN/inf, shapes) and re-derives the drafter; the step is committed only if it passes
            self.rollout.update_params(state.params)
        except ValueError as e:
            raise ValueError(f"step {self.step_count}: the optimizer produced weights the rollout refuses ({e}); "
                             f"the step was not committed (lower --lr or check the data)") from e
        derive_s = self.rollout.derive_seconds[-1] if self.rollout.speculates else 0.0
        self.state = state
        self.updates_done_here += cfg.updates_per_rollout
        t_train = time.perf_counter() - t1

        s = out.stats
        gammas = [g for g in s["gamma_per_step"] if g > 0]
        n_tok = float(sums_total["tokens"])
        metrics = dict(
            step=self.step_count, reward=float(rewards.mean()), reward_std=float(rewards.std()),
            loss=losses[0], loss_last=losses[-1], objective=float(sums_total["objective"]),
            kl=float(sums_total["kl"]) / max(n_tok, 1.0), clip_frac=float(sums_total["clipped"]) / max(n_tok, 1.0),
            grad_norm=grad_norms[0], tokens=int(out.lengths.sum()), mean_length=float(out.lengths.mean()),
            logp_max_abs_diff=max_diff, rollout_s=t_rollout, train_s=t_train, step_s=time.perf_counter() - t0,
            drafter_derive_s=derive_s, tau=s["tau"], gamma_mean=float(np.mean(gammas)) if gammas else 0.0,
            sd_on_fraction=s["sd_on_fraction"], engine_steps=s["steps"], sd_steps=s["sd_steps"],
            gamma_ladder=getattr(self.rollout.policy, "gamma", None), data_pos=self.data_pos,
            rollout_seed=rc.seed)
        self.step_count += 1
        self.data_pos += cfg.prompts_per_step
        if cfg.save_every and self.step_count % cfg.save_every == 0 and self.ckpt_dir:
            self.save()
        return metrics

    def _check_fidelity(self, max_diff: float) -> None:
        self.fidelity.append(max_diff)
        check = self.cfg.fidelity_check == "every" or (self.cfg.fidelity_check == "first" and
                                                       self.updates_done_here == 0)
        if check and self.config.dtype == "float32" and not max_diff <= self.cfg.fidelity_atol:
            raise FidelityError(f"rollout log-probs differ from the trainer's teacher-forced recomputation by "
                                f"{max_diff:.3g} (> {self.cfg.fidelity_atol:g}) at step {self.step_count}: "
                                f"the engine and the loss do not see the same policy")

    def _cast(self, params):
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.config.jnp_dtype), params)

    def _place(self, params):
        """Params on the mesh as `sharding.shard_weights` places them (tensor parallel over "model")."""
        return params if self.mesh is None else sharding.shard_weights(params, self.mesh)

    def _place_opt(self, tx, params, opt_state):
        """The optimizer state on the mesh: each tree of it (AdamW's mu, nu) placed exactly like the (placed)
        params it belongs to, its scalars (the step count) replicated."""
        if self.mesh is None:
            return opt_state
        placement = optax.tree_map_params(tx, lambda _, s: s, opt_state,
                                          jax.tree_util.tree_map(lambda a: a.sharding, params),
                                          transform_non_params=lambda _: sharding.replicated(self.mesh))
        return jax.device_put(opt_state, placement)

    def _new_state(self, params, apply_fn, tx, step=None):
        """A fresh TrainState (zero optimizer moments) for placed params; on a mesh placed too, step included."""
        state = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx)
        if self.mesh is not None:
            state = state.replace(opt_state=self._place_opt(tx, params, state.opt_state),
                                  step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh)))
        return state if step is None else state.replace(step=step)

    def set_params(self, params) -> None:
        """Replace the policy weights (e.g. from outside); validated by the rollout, optimizer state reset."""
        self.rollout.update_params(params)
        self.state = self._new_state(self._place(self._cast(params)), self.state.apply_fn, self.state.tx,
                                     step=self.state.step)

    def run(self, steps: int, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train until `steps` steps are done in total (a resumed run continues its count)."""
        out = []
        while self.step_count < steps:
            m = self.step()
            out.append(m)
            if callback is not None:
                callback(m)
        return out

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def manager(self):
        import orbax.checkpoint as ocp
        if self._manager is None:
            if not self.ckpt_dir:
                raise ValueError("this trainer has no checkpoint directory; pass ckpt_dir=")
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints, create=True,
                                                enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.ckpt_dir, options=opts, item_names=("state", "meta"))
        return self._manager

    def _meta(self) -> dict:
        return _jsonable(dict(step=self.step_count, data_pos=self.data_pos, seed=self.cfg.seed,
                              sampling_seed=self.cfg.sampling_seed,
                              controller=self.rollout.policy.state_dict(), derive_seconds=self.rollout.derive_seconds,
                              grpo=self.cfg.to_dict(), task=self.task.describe(), model=self.config.name))

    def _arrays(self, state=None):
        state = state or self.state
        return {"params": state.params, "opt_state": state.opt_state, "step": jnp.asarray(state.step, jnp.int32)}

    def save(self) -> None:
        """Checkpoint: weights, optimizer state, optimizer step, controller (ladder, τ history, calibration),
        seed and data position."""
        import orbax.checkpoint as ocp
        self.manager.save(self.step_count, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._arrays()), meta=ocp.args.JsonSave(self._meta())), force=True)
        self.manager.wait_until_finished()

    def latest_checkpoint(self) -> int | None:
        return self.manager.latest_step() if self.ckpt_dir and os.path.isdir(self.ckpt_dir) else None

    def restore(self, step: int | None = None) -> int:
        """Load a checkpoint (default: the latest) into this trainer; returns its step."""
        import orbax.checkpoint as ocp
        step = self.latest_checkpoint() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint to resume from in {self.ckpt_dir}")
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                          self._arrays())
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        meta, arrays = got["meta"], got["state"]
        if (meta["seed"], meta.get("sampling_seed")) != (self.cfg.seed, self.cfg.sampling_seed):
            raise ValueError(f"checkpoint seeds {meta['seed']}, {meta.get('sampling_seed')} differ from this run's "
                             f"{self.cfg.seed}, {self.cfg.sampling_seed}")
        self.rollout.policy.load_state_dict(meta["controller"])
        self.rollout.update_params(arrays["params"])
        # The abstract target carries this trainer's shardings: Orbax reads any mesh shape's checkpoint into them.
        self.state = self.state.replace(params=self._cast(arrays["params"]), opt_state=arrays["opt_state"],
                                        step=arrays["step"])
        self.step_count, self.data_pos = int(meta["step"]), int(meta["data_pos"])
        return step

    # -- parking (several trainers in lockstep on a small machine) -----------------------------------------
    def offload(self, path: str) -> None:
        """Write weights and optimizer state to `path` (.npy files) and drop them from memory (also the rollout's
        weights and drafter). `reload()` brings them back bit for bit; `step()` needs a loaded trainer."""
        leaves, treedef = jax.tree_util.tree_flatten((self.state.params, self.state.opt_state))
        os.makedirs(path, exist_ok=True)
        for i, x in enumerate(leaves):
            np.save(os.path.join(path, f"{i}.npy"), np.asarray(x))
        self._offloaded = (path, treedef, len(leaves))
        self.state = self.state.replace(params=None, opt_state=None)
        self.rollout.weights = self.rollout.drafter = None

    def reload(self) -> None:
        path, treedef, n = self._offloaded
        leaves = [jnp.asarray(np.load(os.path.join(path, f"{i}.npy"))) for i in range(n)]
        params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
        params = self._place(params)
        opt_state = self._place_opt(self.state.tx, params, opt_state)
        self.rollout.update_params(params)  # re-derives the drafter (outside any timed step)
        self.state = self.state.replace(params=params, opt_state=opt_state)
        self._offloaded = None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def warmup(self) -> dict:
        """Compile outside timed steps: every engine step the policy may choose (SpecRollout.warmup: each batch
        bucket x γ, prefill, compaction) and the training step (ahead-of-time, nothing executed). Returns the
        seconds spent per part."""
        t0 = time.perf_counter()
        self.rollout.warmup(self.rollout_config, prompt_lens=[self.max_prompt_len], group_size=self.cfg.samples)
        t1 = time.perf_counter()
        mb = self.cfg.micro_batch or self.cfg.rows
        rows = None if self.mesh is None else sharding.rows_sharding(self.mesh)
        spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rows)
        w = self.cfg.max_new_tokens
        batch = dict(seq=spec((mb, self.total_len), jnp.int32), index=spec((mb, w), jnp.int32),
                     completion=spec((mb, w), jnp.int32), mask=spec((mb, w), jnp.bool_),
                     old_logp=spec((mb, w), jnp.float32), adv=spec((mb,), jnp.float32),
                     weights=spec((mb,), jnp.float32))
        ref = spec((mb, w), jnp.float32) if self.reference is not None else None
        self._grad.lower(self.state.params, batch, ref).compile()
        if self.reference is not None:
            self._ref.lower(self.reference, batch).compile()
        grads = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=None if self.mesh is None else a.sharding),
            self.state.params)
        self._apply.lower(self.state, grads).compile()
        return {"rollout_compile_s": t1 - t0, "train_compile_s": time.perf_counter() - t1}


def write_jsonl(path: str, records: list[dict], mode: str = "a") -> None:
    with open(path, mode) as f:
        for r in records:
            f.write(json.dumps(_jsonable(r)) + "\n")
