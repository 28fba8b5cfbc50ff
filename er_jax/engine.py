"""The decode engine: bucket map, compile cache, jitted prefill / AR / SD steps, and the host loop with
active-set compaction and bookkeeping.

Per-row randomness: row r's key is fold_in(seed key, r) and the key of a step is fold_in(row key,
tokens generated so far), so a row's tokens never depend on which batch bucket or slot it sits in.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from er_jax.cache import KVCache, cache_bytes, gather_rows, init_cache
from er_jax.config import ModelConfig, SamplingConfig
from er_jax.controller import StepRecord, step_intensity
from er_jax.execution import Execution
from er_jax.model import forward
from er_jax.sharding import cache_sharding, global_decision, replicated, rows_sharding, to_host
from er_jax.speculative import draft, verify

MAX_DRAFT = 16  # the largest γ the engine supports (the cache keeps this much headroom)
STEP_KINDS = ("prefill", "ar", "sd", "compact")  # the jitted steps of Engine.step
MIN_PROMPT_BUCKET = 16


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def size_bucket(n: int, floor: int = 1, fine_above: int = 16) -> int:
    """Powers of two, and above `fine_above` also 1.5x them (24, 48, 96, ...): the smallest such size >= n
    (at least `floor`). Shapes are static, so every padded row or position is computed; where that is
    compute-bound, powers of two alone wasted up to half of it."""
    b = pow2_at_least(n, floor)
    return 3 * b // 4 if b > fine_above and n <= 3 * b // 4 else b


def batch_bucket(n: int, data_parallel: int = 1) -> int:
    """The one map from a runtime row count to a static batch size: a size_bucket times the number of
    data-parallel shards, so every bucket splits evenly over the mesh's "data" axis. Up to 16 rows a step
    streams the weights (padded rows are nearly free); above, it is compute-bound on CPU, where the 1.5x
    buckets cut the RL-like workload's padded slots per step from ~15 to ~6 (docs/internals.md)."""
    return data_parallel * size_bucket(-(-n // data_parallel))


def batch_buckets(max_batch: int, data_parallel: int = 1) -> list[int]:
    """Every batch bucket up to `max_batch` (itself a bucket), smallest first."""
    return sorted({batch_bucket(n, data_parallel) for n in range(1, max_batch + 1)})


def prompt_bucket(n: int) -> int:
    """The one map from a runtime prompt length to a static prompt length: 16, 24, 32, 48, 64, 96, ...
    (SmolLM2 chat prompts of 36-44 tokens ran as 64 with powers of two; now 48)."""
    return size_bucket(n, MIN_PROMPT_BUCKET)


@struct.dataclass
class DecodeState:
    """Per-slot decode state of one batch bucket, plus the rollout's output buffers (indexed by row id)."""

    cache: KVCache
    last: jax.Array  # int32 [B]  sampled token at position cache.lengths, not yet fed
    n_gen: jax.Array  # int32 [B]  tokens generated so far (incl. `last`)
    done: jax.Array  # bool [B]
    row: jax.Array  # int32 [B]  output row of each slot (padding slots point at a scratch row)
    keys: jax.Array  # [B] typed PRNG keys, one per row
    max_new: jax.Array  # int32 [B]  per-row token limit
    min_new: jax.Array  # int32 [B]  EOS is ignored before this many tokens (forced-length benchmarks)
    out_tokens: jax.Array  # int32 [max_batch+1, max_new + max_draft + 1]  (last row: scratch for padding slots)
    out_logps: jax.Array  # f32 same shape
    out_len: jax.Array  # int32 [max_batch+1]  tokens generated per output row


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a compiled step (part of the compile-cache key with the bucket)."""

    config: ModelConfig
    sampling: SamplingConfig
    eos_ids: tuple[int, ...]
    ex: Execution
    forced_acceptance: float | None = None  # bench only (see Engine): not lossless

    @property
    def mesh(self) -> Mesh | None:
        return self.ex.mesh


def _place(spec: StepSpec, st: DecodeState) -> DecodeState:
    """Keep the decode state where it belongs on the mesh: batch over "data", KV heads over "model"."""
    if spec.mesh is None:
        return st
    rows = lambda a: jax.lax.with_sharding_constraint(a, rows_sharding(spec.mesh))
    c = cache_sharding(spec.mesh)
    cache = KVCache(jax.lax.with_sharding_constraint(st.cache.k, c), jax.lax.with_sharding_constraint(st.cache.v, c),
                    rows(st.cache.lengths))
    return dataclasses.replace(st, cache=cache, last=rows(st.last), n_gen=rows(st.n_gen), done=rows(st.done),
                               row=rows(st.row), max_new=rows(st.max_new), min_new=rows(st.min_new))


def _is_eos(spec: StepSpec, tokens):
    if not spec.eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(spec.eos_ids, jnp.int32))


def _emit(spec: StepSpec, st: DecodeState, tokens, logps, count, new_cache: KVCache):
    """Append `count[b]` of `tokens[b]` to each live row, ending rows at EOS or their token limit.
    The first token of `tokens` is fed to the cache (position cache.lengths) by the caller's forward."""
    live = ~st.done
    pos = jnp.arange(tokens.shape[1])[None, :]
    count = jnp.minimum(count, st.max_new - st.n_gen)
    eos = _is_eos(spec, tokens) & (st.n_gen[:, None] + pos + 1 > st.min_new[:, None]) & (pos < count[:, None])
    first_eos = jnp.argmax(eos, axis=1)
    count = jnp.where(eos.any(axis=1), first_eos + 1, count)
    count = jnp.where(live, count, 0)
    cols = st.n_gen[:, None] + pos
    write = pos < count[:, None]
    rows = jnp.where(write, st.row[:, None], scratch_row(st.out_tokens.shape[0] - 1))  # masked writes: scratch
    out_tokens = st.out_tokens.at[rows, cols].set(jnp.where(write, tokens, 0))
    out_logps = st.out_logps.at[rows, cols].set(jnp.where(write, logps, 0.0))
    last = jnp.where(count > 0, jnp.take_along_axis(tokens, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0],
                     st.last)
    n_gen = st.n_gen + count
    done = st.done | (live & (eos.any(axis=1) | (n_gen >= st.max_new)))
    cache = KVCache(new_cache.k, new_cache.v, st.cache.lengths + count)
    out_len = st.out_len.at[st.row].set(n_gen)
    return _place(spec, dataclasses.replace(st, cache=cache, last=last, n_gen=n_gen, done=done,
                                            out_tokens=out_tokens, out_logps=out_logps, out_len=out_len))


def scratch_row(max_batch: int) -> int:
    """The output buffers' extra last row (they have max_batch + 1 rows, so their shapes depend on max_batch
    only): padding slots point at it and masked writes land in it; it is never read back."""
    return max_batch


def prefilled_lengths(prompt_lens):
    """Cache lengths right after the prefill forward, before `_emit` advances each row by one: the prompt's
    last token was fed (its K/V written), but `_emit` counts a fed token when it emits the token sampled from
    it, as it does for every later step. So lengths are prompt_lens - 1 here and prompt_lens after `_emit`."""
    return prompt_lens - 1


def _step_keys(st: DecodeState):
    return jax.vmap(jax.random.fold_in)(st.keys, st.n_gen)


def ar_step(spec: StepSpec, weights, st: DecodeState):
    logits, cache = forward(spec.config, weights, st.last[:, None], st.cache, ex=spec.ex)
    tok, lp = spec.ex.op("sample_logits")(_step_keys(st), logits[:, 0], spec.sampling, ex=spec.ex)
    ones = jnp.ones_like(st.n_gen)
    return _emit(spec, st, tok[:, None], lp[:, None], ones, cache), jnp.zeros_like(st.n_gen)


def sd_step(spec: StepSpec, gamma: int, weights, drafter, st: DecodeState):
    keys = _step_keys(st)
    k_draft, k_verify = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    cache, d_tok, d_logits = draft(spec.config, drafter, st.cache, st.last, spec.sampling, k_draft, gamma, spec.ex)
    cache, n_acc, tokens, logps = verify(spec.config, weights, cache, st.last, d_tok, d_logits,
                                         spec.sampling, k_verify, spec.ex)
    if spec.forced_acceptance is not None:  # bench only: i.i.d. Bernoulli(α) acceptances replace the test
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (gamma,)))(k_verify)
        n_acc = jnp.sum(jnp.cumprod(u < spec.forced_acceptance, axis=1), axis=1).astype(jnp.int32)
        tokens = jnp.concatenate([d_tok, tokens[:, -1:]], axis=1)  # any ids will do: rows have forced lengths
    return _emit(spec, st, tokens, logps, n_acc + 1, cache), n_acc


def prefill(spec: StepSpec, weights, st: DecodeState, prompts, prompt_lens, src, prefix=None, prefix_len=None):
    """Feed the distinct padded prompts (int [U, P], lengths [U]) into a fresh cache, copy prompt `src[b]`'s
    entries into slot b of the state's cache (int [B]) and sample each slot's first token from its prompt's
    last logits, with the slot's own key. Slots sharing a prompt (GRPO's G samples of it) cost one prefill
    row between them. Padding slots (done from the start) get an empty cache row. With `prefix` (int [1, C],
    its first `prefix_len` (int scalar) tokens real): the tokens every prompt starts with (`shared_prefix`),
    fed once, their entries given to every row before `prompts` (each prompt's rest) follow them."""
    u, p = prompts.shape
    if prefix is None:
        fresh = init_cache(spec.config, u, p)
        start = 0
    else:
        one = init_cache(spec.config, 1, prefix.shape[1] + p)
        _, one = forward(spec.config, weights, prefix, one, logit_index=jnp.zeros((1, 1), jnp.int32), ex=spec.ex)
        rows = lambda a: jnp.broadcast_to(a, a.shape[:1] + (u,) + a.shape[2:])
        start = prefix_len
        fresh = KVCache(rows(one.k), rows(one.v), jnp.full((u,), start, jnp.int32))
    logits, fresh = forward(spec.config, weights, prompts, fresh, logit_index=(prompt_lens - 1)[:, None],
                            ex=spec.ex)
    logits = jnp.take(logits[:, 0], src, axis=0)
    put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, jnp.take(part, src, axis=1), 0, axis=2)
    k, v = put(st.cache.k, fresh.k), put(st.cache.v, fresh.v)
    lens = jnp.where(st.done, 1, start + jnp.take(prompt_lens, src))
    tok, lp = spec.ex.op("sample_logits")(_step_keys(st), logits, spec.sampling, ex=spec.ex)
    st = dataclasses.replace(st, cache=KVCache(k, v, prefilled_lengths(lens)))
    return _emit(spec, st, tok[:, None], lp[:, None], jnp.ones_like(lens), st.cache)


def shared_prefix(prompts: list[list[int]], rows: int, max_len: int) -> int:
    """How many leading tokens the prefill feeds once for all `prompts` (the distinct ones; 0: none): their
    longest common prefix, each keeping >= 1 token of its own (the one it samples from), where that computes
    fewer positions for `rows` prefill rows than padding every prompt whole, within a `max_len` cache. Chat
    prompts share their template's opening (SmolLM2's system prompt and user header: 24 tokens)."""
    if len(prompts) < 2:
        return 0
    first, c = prompts[0], min(map(len, prompts)) - 1
    for q in prompts[1:]:
        c = next((i for i in range(c) if q[i] != first[i]), c)
    longest = max(map(len, prompts))
    cb, sb = prompt_bucket(c), prompt_bucket(longest - c)
    return c if c > 0 and cb + rows * sb < rows * prompt_bucket(longest) and cb + sb <= max_len else 0


def prefill_inputs(prompts: list[list[int]], rows: int, max_len: int, pad_id: int):
    """The distinct `prompts`' prefill arguments for `rows` prefill rows (their batch bucket): the rest of each
    after the shared prefix, padded (int [rows, P]), its lengths ([rows]; padding rows 1) and the prefix (int
    [1, C] and its length, or None and 0)."""
    c = shared_prefix(prompts, rows, max_len)
    rest = [q[c:] for q in prompts]
    lens = np.array([len(q) for q in rest], np.int32)
    padded = np.full((rows, prompt_bucket(int(lens.max()))), pad_id, np.int32)
    for i, q in enumerate(rest):
        padded[i, : len(q)] = q
    if c == 0:
        return padded, prefill_lengths(lens, rows), None, 0
    prefix = np.full((1, prompt_bucket(c)), pad_id, np.int32)
    prefix[0, :c] = prompts[0][:c]
    return padded, prefill_lengths(lens, rows), prefix, c


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """The distinct prompts in first-seen order and, per row, the index of its prompt among them."""
    index: dict[tuple[int, ...], int] = {}
    src = np.array([index.setdefault(tuple(p), len(index)) for p in prompts], np.int32)
    return [list(p) for p in index], src


def compact(spec: StepSpec, st: DecodeState, slots):
    """Gather the slots `slots` (int [B']) into a smaller bucket; output buffers are kept whole."""
    take = lambda a: jnp.take(a, slots, axis=0)
    return _place(spec, dataclasses.replace(st, cache=gather_rows(st.cache, slots), last=take(st.last),
                               n_gen=take(st.n_gen), done=take(st.done), row=take(st.row),
                               keys=take(st.keys), max_new=take(st.max_new), min_new=take(st.min_new)))


@dataclasses.dataclass
class RolloutOutput:
    """tokens / logprobs: [N, max_new_tokens] numpy (pad_id / 0 past each row's length)."""

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    stats: dict[str, Any]


class Engine:
    """Owns the compile cache and runs rollouts. Weights are arguments, so swapping them never recompiles."""

    def __init__(self, config: ModelConfig, *, max_batch: int, max_prompt_len: int, max_new_tokens: int,
                 max_draft: int = MAX_DRAFT, ex: Execution = Execution(), kv_budget_bytes: int | None = None,
                 forced_acceptance: float | None = None):
        """forced_acceptance (benchmarks only): every speculative step accepts each draft position with this
        probability, independently, instead of running the rejection test, so a random-weight model of a real
        size drafts as well as a measured real one. Output tokens are then NOT samples of the target (and not
        lossless); it exists to time rollouts at a chosen acceptance, with forced row lengths."""
        for name, val in (("max_batch", max_batch), ("max_prompt_len", max_prompt_len),
                          ("max_new_tokens", max_new_tokens)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if not 0 <= max_draft <= MAX_DRAFT:
            raise ValueError(f"max_draft must be in [0, {MAX_DRAFT}], got {max_draft}")
        if forced_acceptance is not None and not 0 <= forced_acceptance <= 1:
            raise ValueError(f"forced_acceptance must be in [0, 1] (or None: exact verification), got "
                             f"{forced_acceptance}")
        self.forced_acceptance = None if forced_acceptance is None else float(forced_acceptance)
        self.config = config
        self.ex = ex
        self.mesh = ex.mesh
        self.data_parallel = 1 if ex.mesh is None else int(ex.mesh.shape["data"])
        self.max_batch = batch_bucket(max_batch, self.data_parallel)
        self.max_prompt_len = int(max_prompt_len)
        self.max_new_tokens = int(max_new_tokens)
        self.max_draft = int(max_draft)
        # Drafting writes up to γ positions past the last emitted token; verify writes γ+1.
        self.max_len = prompt_bucket(max_prompt_len) + self.max_new_tokens + self.max_draft + 1
        self.kv_bytes = cache_bytes(config, self.max_batch, self.max_len)
        if kv_budget_bytes is not None and self.kv_bytes > kv_budget_bytes:
            raise ValueError(
                f"the KV cache needs {self.kv_bytes / 2**20:.1f} MiB for max_batch={self.max_batch} x "
                f"max_len={self.max_len} (prompt bucket {prompt_bucket(max_prompt_len)} + {max_new_tokens} new "
                f"+ {self.max_draft + 1} draft headroom), over the budget of {kv_budget_bytes / 2**20:.1f} MiB; "
                f"lower max_batch, max_prompt_len or max_new_tokens, or raise the budget")
        self._jitted: dict[tuple, Callable] = {}
        self._signatures: set = set()

    # -- compile cache -------------------------------------------------------------------------------
    def step(self, kind: str, spec: StepSpec, gamma: int, *args):
        """Run the jitted step `kind` (one of STEP_KINDS) on `args`; shapes (set by the buckets) and statics
        pick its executable, compiled once. Arguments per kind: "prefill" (weights, state, distinct prompts
        [U, P], their lengths [U], each slot's prompt [B]) -> state; "ar" (weights, drafter (ignored), state)
        -> (state, accepted = 0); "sd" (weights, drafter, state) -> (state, accepted drafts per row); "compact"
        (state, slots [B']) -> state. The state argument is donated (except for compact)."""
        if kind not in STEP_KINDS:
            raise ValueError(f"step kind must be one of {STEP_KINDS}, got {kind!r}")
        if kind == "ar":
            args = (args[0],) + args[2:]  # the AR step takes no drafter
        key = (kind, spec, gamma)
        if key not in self._jitted:
            if kind == "prefill":
                fn = jax.jit(functools.partial(prefill, spec), donate_argnums=(1,))
            elif kind == "ar":
                fn = jax.jit(functools.partial(ar_step, spec), donate_argnums=(1,))
            elif kind == "sd":
                fn = jax.jit(functools.partial(sd_step, spec, gamma), donate_argnums=(2,))
            else:  # compact: the output has other shapes, so donating would not let XLA reuse buffers
                fn = jax.jit(functools.partial(compact, spec))
            self._jitted[key] = fn
        shapes = tuple((a.shape, a.dtype) for a in jax.tree_util.tree_leaves(args) if hasattr(a, "shape"))
        self._signatures.add((key, shapes))
        return self._jitted[key](*args)

    @property
    def compile_count(self) -> int:
        """Distinct executables used so far: (step kind, statics, γ, shapes), each compiled once by jit."""
        return len(self._signatures)

    def warmup(self, weights, drafter, gammas, sampling: SamplingConfig, eos_ids: tuple[int, ...],
               prompt_lens=None, group_size: int = 1, prompts=None) -> int:
        """Compile every step a rollout may need: prefill per (batch bucket, prompt bucket) for rows that
        come `group_size` to a prompt (GRPO's G; prefill runs once per distinct prompt), a step per (batch
        bucket, γ in `gammas`) and every compaction between buckets. With `prompts` (token id lists; their
        lengths are the default `prompt_lens`), also the prefill those prompts take (their shared prefix
        fed once, `shared_prefix`). Returns executables added."""
        if int(group_size) < 1:
            raise ValueError(f"group_size must be >= 1 (rows per distinct prompt), got {group_size}")
        if prompts is not None and prompt_lens is None:
            prompt_lens = [len(q) for q in prompts]
        before = self.compile_count
        spec = StepSpec(self.config, sampling, tuple(eos_ids), self.ex, self.forced_acceptance)
        buckets = batch_buckets(self.max_batch, self.data_parallel)
        pbs = sorted({prompt_bucket(p) for p in (prompt_lens or [self.max_prompt_len])})
        for b in buckets:
            limit = np.full(b, self.max_new_tokens, np.int32)
            u = batch_bucket(-(-b // int(group_size)), self.data_parallel)
            for pb in pbs:
                st = self.initial_state(b, b, 0, limit, limit)
                st = self.step("prefill", spec, 0, weights, st, self._put(jnp.zeros((u, pb), jnp.int32)),
                               self._put(jnp.ones((u,), jnp.int32)), self._put(jnp.zeros((b,), jnp.int32)))
            if prompts is not None and b == batch_bucket(len(prompts), self.data_parallel):
                distinct, src = distinct_prompts([list(map(int, q)) for q in prompts])
                n = len(prompts)
                st = self.initial_state(n, b, 0, limit[:n], limit[:n])
                st = self._prefill_step(spec, weights, st, distinct, np.resize(src, b), 0)
            for g in gammas:
                st, _ = self.step("ar" if g == 0 else "sd", spec, g, weights, drafter, st)
            for smaller in buckets[: buckets.index(b)]:
                self.step("compact", spec, 0, st, self._put(jnp.arange(smaller, dtype=jnp.int32)))
        jax.block_until_ready(st)
        return self.compile_count - before

    # -- one rollout ----------------------------------------------------------------------------------
    def initial_state(self, n_rows: int, bucket: int, seed: int, max_new: np.ndarray,
                      min_new: np.ndarray) -> DecodeState:
        """An empty decode state of `bucket` slots, the first `n_rows` holding rows 0..n_rows-1 (per-row limits
        `max_new` / `min_new`, int [n_rows]); the rest are finished padding slots writing to the scratch row.
        Placed on the mesh; feed it to `step("prefill", ...)`."""
        rows = np.arange(bucket)
        scratch = scratch_row(self.max_batch)
        row = np.where(rows < n_rows, rows, scratch).astype(np.int32)
        base = jax.random.key(seed)
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(bucket))
        pad = lambda a, fill: np.concatenate([a, np.full(bucket - n_rows, fill, a.dtype)])
        width = self.max_new_tokens + self.max_draft + 1
        return self._put(DecodeState(
            cache=init_cache(self.config, bucket, self.max_len), last=jnp.zeros(bucket, jnp.int32),
            n_gen=jnp.zeros(bucket, jnp.int32), done=jnp.asarray(rows >= n_rows), row=jnp.asarray(row),
            keys=keys, max_new=jnp.asarray(pad(max_new, 1)), min_new=jnp.asarray(pad(min_new, 0)),
            out_tokens=jnp.zeros((scratch + 1, width), jnp.int32),
            out_logps=jnp.zeros((scratch + 1, width), jnp.float32), out_len=jnp.zeros(scratch + 1, jnp.int32)))

    def _put(self, tree):
        """Host-made inputs onto the mesh: a DecodeState split as `_place` says, anything else replicated."""
        if self.mesh is None:
            return tree
        if isinstance(tree, DecodeState):
            rows, rep, c = rows_sharding(self.mesh), replicated(self.mesh), cache_sharding(self.mesh)
            shardings = DecodeState(KVCache(c, c, rows), rows, rows, rows, rows, rows, rows, rows, rep, rep, rep)
            return jax.device_put(tree, shardings)
        return jax.device_put(tree, replicated(self.mesh))

    # -- one rollout: prefill, then per step compact -> choose -> step -> record, then finish -------------
    def run(self, weights, drafter, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int,
            eos_ids: tuple[int, ...], max_new: np.ndarray, min_new: np.ndarray, policy, costs=None,
            pad_id: int = 0, progress: Callable[[int], None] | None = None,
            trace: Callable[[StepRecord], None] | None = None) -> RolloutOutput:
        """Decode `prompts` (validated token lists) to the end. `policy.choose(...)` picks γ per step;
        `costs` (controller.ModelCosts) adds each step's FLOPs and bytes moved to its StepRecord; `trace` and
        `progress` see each step's record and its emitted-token count."""
        n = len(prompts)
        spec = StepSpec(self.config, sampling, tuple(eos_ids), self.ex, self.forced_acceptance)
        t0 = time.perf_counter()
        st = self._prefill(spec, weights, prompts, seed, max_new, min_new, pad_id)
        host = _Host(*to_host((st.done, st.n_gen, st.cache.lengths)))
        policy.start_rollout()
        records: list[StepRecord] = []
        controller_s = 0.0  # host time in the policy (choose, observe, end_rollout), part of the rollout's wall time
        while not host.done.all():
            st, host = self._compact(spec, st, host)
            tc = time.perf_counter()
            active, ctx = host.active, host.mean_context
            gamma = global_decision(int(policy.choose(host.bucket, active, ctx)))
            ts, compiles = time.perf_counter(), self.compile_count
            st, n_acc = self.step("ar" if gamma == 0 else "sd", spec, gamma, weights, drafter, st)
            # The one small host read per step (it also ends the step's timing).
            new = _Host(*to_host((st.done, st.n_gen, st.cache.lengths)))
            n_acc = to_host(n_acc)
            rec = self._record(len(records), time.perf_counter() - ts, host, new, gamma, n_acc,
                               self.compile_count > compiles, costs)
            tc2 = time.perf_counter()
            policy.observe(rec)
            controller_s += (ts - tc) + (time.perf_counter() - tc2)
            records.append(rec)
            if trace is not None:
                trace(rec)
            if progress is not None:
                progress(rec.emitted)
            host = new
        tc = time.perf_counter()
        policy.end_rollout()
        controller_s += time.perf_counter() - tc
        return self._finish(st, n, pad_id, records, t0, controller_s)

    def _prefill(self, spec: StepSpec, weights, prompts, seed, max_new, min_new, pad_id) -> DecodeState:
        """Pad the distinct prompts into their (batch, prompt) bucket, prefill them once each, give every row
        its prompt's cache entries and sample each row's first token. Padding prompts are one token long
        (`prefill_lengths`); padding slots point at prompt 0."""
        bucket = batch_bucket(len(prompts), self.data_parallel)
        distinct, src = distinct_prompts(prompts)
        st = self.initial_state(len(prompts), bucket, seed, max_new, min_new)
        src = np.concatenate([src, np.zeros(bucket - len(prompts), np.int32)])
        return self._prefill_step(spec, weights, st, distinct, src, pad_id)

    def _prefill_step(self, spec: StepSpec, weights, st: DecodeState, distinct, src, pad_id: int) -> DecodeState:
        padded, lens, prefix, c = prefill_inputs(distinct, batch_bucket(len(distinct), self.data_parallel),
                                                 self.max_len, pad_id)
        shared = () if prefix is None else (self._put(jnp.asarray(prefix)), self._put(jnp.int32(c)))
        return self.step("prefill", spec, 0, weights, st, self._put(jnp.asarray(padded)), self._put(jnp.asarray(lens)),
                         self._put(jnp.asarray(src)), *shared)

    def _compact(self, spec: StepSpec, st: DecodeState, host: "_Host"):
        """When the live rows fit a smaller batch bucket, gather them into it: live slots first, then finished
        ones as filler. Returns the (maybe) compacted state and its host view."""
        new_bucket = batch_bucket(host.active, self.data_parallel)
        if new_bucket >= st.last.shape[0]:
            return st, host
        slots = np.concatenate([np.flatnonzero(~host.done), np.flatnonzero(host.done)])[:new_bucket]
        st = self.step("compact", spec, 0, st, self._put(jnp.asarray(slots, jnp.int32)))
        return st, _Host(host.done[slots], host.n_gen[slots], host.ctx_len[slots])

    @staticmethod
    def _record(index: int, wall_s: float, before: "_Host", after: "_Host", gamma: int, n_acc, compiled: bool,
                costs) -> StepRecord:
        """The step's StepRecord: counts over the rows that were live when it started."""
        live = ~before.done
        flops, nbytes = (0.0, 0.0) if costs is None else step_intensity(costs, before.bucket, before.mean_context,
                                                                        gamma)
        return StepRecord(step=index, wall_s=wall_s, batch_bucket=before.bucket, active=before.active,
                          mean_context=before.mean_context, gamma=gamma,
                          emitted=int((after.n_gen - before.n_gen)[live].sum()),
                          accepted_per_position=[int((n_acc[live] > i).sum()) for i in range(gamma)],
                          rows_reaching_position=[int((n_acc[live] >= i).sum()) for i in range(gamma)],
                          flops=flops, bytes=nbytes, compiled=compiled)

    def _finish(self, st: DecodeState, n: int, pad_id: int, records: list[StepRecord], t0: float,
                controller_s: float) -> RolloutOutput:
        """Read the output rows back (the first `n`; the scratch row is dropped) and summarize the rollout."""
        out_tokens, out_logps, lengths = to_host((st.out_tokens, st.out_logps, st.out_len))
        width = self.max_new_tokens
        inside = np.arange(width)[None] < lengths[:n, None]
        tokens = np.where(inside, out_tokens[:n, :width], pad_id)
        logps = np.where(inside, out_logps[:n, :width], 0.0)
        stats = summarize(records, time.perf_counter() - t0, int(lengths[:n].sum()))
        stats["controller_s"] = controller_s
        return RolloutOutput(tokens.astype(np.int32), lengths[:n].astype(np.int32), logps.astype(np.float32),
                             stats)


@dataclasses.dataclass(frozen=True)
class _Host:
    """The host's copy of the per-slot bookkeeping it reads once per step."""

    done: np.ndarray
    n_gen: np.ndarray
    ctx_len: np.ndarray

    @property
    def bucket(self) -> int:
        return len(self.done)

    @property
    def active(self) -> int:
        return int((~self.done).sum())

    @property
    def mean_context(self) -> float:
        return float(self.ctx_len[~self.done].mean())


def prefill_lengths(prompt_lens: np.ndarray, bucket: int) -> np.ndarray:
    """Prompt lengths of a whole bucket: padding rows (past the real ones) get a one-token prompt. Prefill feeds
    every prompt token and samples the first new one, so a row's cache then holds `len(prompt)` entries."""
    return np.concatenate([prompt_lens, np.ones(bucket - len(prompt_lens), np.int32)]).astype(np.int32)


def summarize(steps: list[StepRecord], wall_s: float, tokens: int) -> dict[str, Any]:
    """Rollout statistics: time, steps, τ, acceptance per draft position, γ per step, SD-on fraction.
    `step_records` holds each step's StepRecord as a dict (StepRecord.to_dict)."""
    sd = [s for s in steps if s.gamma > 0]
    width = max((s.gamma for s in sd), default=0)
    acc = np.zeros(width)
    reach = np.zeros(width)
    for s in sd:
        acc[: s.gamma] += s.accepted_per_position
        reach[: s.gamma] += s.rows_reaching_position
    sd_rows = sum(s.rows_reaching_position[0] for s in sd)
    return {
        "wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "steps": len(steps), "sd_steps": len(sd), "ar_steps": len(steps) - len(sd),
        "sd_on_fraction": len(sd) / len(steps) if steps else 0.0,
        "gamma_per_step": [s.gamma for s in steps],
        "active_per_step": [s.active for s in steps],
        "drafted": int(sum(s.drafted for s in sd)),
        "accepted": int(acc.sum()),
        # τ: mean tokens a row gains per speculative step (accepted drafts + the corrected / bonus token)
        "tau": float((acc.sum() + sd_rows) / sd_rows) if sd_rows else None,
        "acceptance_per_position": [float(a / r) if r else None for a, r in zip(acc, reach)],
        "step_records": [s.to_dict() for s in steps],
    }
