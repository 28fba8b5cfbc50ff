"""Tasks with verifiable rewards for GRPO.

A task is an endless, deterministic stream of examples (example `i` depends only on the task's seed and
`i`, so a resumed run continues from its data position with the very same prompts) plus a reward function
of a completion.

- `ArithmeticTask`: one-step arithmetic word problems for a chat model (SmolLM2-Instruct). The prompt is the
  problem rendered with the model's chat template; the reward is 1 when the last integer in the decoded
  completion equals the answer exactly, else 0.
- `TinyCopyTask`: a from-scratch setting for tests and demos. A small vocabulary, a tiny random decoder
  (`tiny_model_config`), prompts `[BOS, x, noise...]` with `x` from a few symbols; the reward is the fraction
  of the `max_new_tokens` completion positions that emit `x` (an early EOS forfeits the rest). A random model
  scores about 1/vocab; GRPO lifts it within a few dozen steps on a CPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from er_jax.config import ModelConfig

TASKS = ("arithmetic", "tiny")


@dataclass(frozen=True)
class Example:
    """One prompt: token ids, the reference answer, and the readable text (for logs)."""

    index: int
    prompt: tuple[int, ...]
    answer: Any
    text: str = ""


class Task:
    """Base class: `examples(start, n)` (deterministic by index) and `reward(tokens, length, example)`."""

    name = ""
    max_prompt_len = 0  # an upper bound on every prompt's token count

    def example(self, index: int) -> Example:
        raise NotImplementedError

    def examples(self, start: int, n: int) -> list[Example]:
        if start < 0 or n < 1:
            raise ValueError(f"examples needs start >= 0 and n >= 1, got {start}, {n}")
        return [self.example(i) for i in range(start, start + n)]

    def reward(self, tokens: np.ndarray, length: int, example: Example) -> float:
        """Reward of one completion: `tokens` is the full-width row (pad past `length`)."""
        raise NotImplementedError

    def rewards(self, tokens: np.ndarray, lengths: np.ndarray, examples: Sequence[Example]) -> np.ndarray:
        if not len(tokens) == len(lengths) == len(examples):
            raise ValueError(f"rewards needs as many rows as examples, got {len(tokens)}, {len(lengths)}, "
                             f"{len(examples)}")
        return np.array([self.reward(np.asarray(t), int(n), e) for t, n, e in zip(tokens, lengths, examples)],
                        np.float32)

    def describe(self) -> dict:
        return {"task": self.name}


# ---------------------------------------------------------------------------------------------------------
# Arithmetic word problems
# ---------------------------------------------------------------------------------------------------------
_NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lena", "Omar", "Julia", "Kai", "Nora")
_ITEMS = ("apples", "marbles", "books", "stickers", "pencils", "cookies", "coins", "cards")
# (operation, template); {n} name, {i} item, {a} {b} operands. Subtraction keeps a >= b.
_TEMPLATES = (
    ("+", "{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?"),
    ("+", "A box holds {a} {i}. Someone puts in {b} more {i}. How many {i} are in the box?"),
    ("-", "{n} has {a} {i} and gives away {b}. How many {i} does {n} have left?"),
    ("-", "There are {a} {i} on a table. {n} takes {b} of them. How many {i} are still on the table?"),
    ("*", "{n} has {a} bags with {b} {i} in each bag. How many {i} does {n} have in total?"),
)
INSTRUCTION = "Answer with a single number."
_INT = re.compile(r"-?\d[\d,]*")


def last_integer(text: str) -> int | None:
    """The last integer in `text` (thousands separators allowed: "1,234" -> 1234), or None."""
    found = _INT.findall(text)
    if not found:
        return None
    s = found[-1].rstrip(",").replace(",", "")
    try:
        return int(s)
    except ValueError:
        return None


class ArithmeticTask(Task):
    """One-operation word problems (+, -, ×) with operands in [1, max_operand], chat-formatted.

    Reward: 1.0 iff the last integer in the decoded completion equals the answer, else 0.0."""

    name = "arithmetic"

    def __init__(self, tokenizer, seed: int = 0, max_operand: int = 20, ops: Sequence[str] = ("+", "-", "*"),
                 instruction: str = INSTRUCTION):
        if tokenizer is None or not hasattr(tokenizer, "chat"):
            raise ValueError("the arithmetic task needs a tokenizer with a chat template (e.g. SmolLM2-Instruct)")
        if max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {max_operand}")
        ops = tuple(ops)
        if not ops or set(ops) - {"+", "-", "*"}:
            raise ValueError(f"ops must be a non-empty subset of '+', '-', '*', got {ops}")
        self.tokenizer, self.seed, self.max_operand, self.ops = tokenizer, int(seed), int(max_operand), ops
        self.instruction = instruction
        self.templates = tuple(t for t in _TEMPLATES if t[0] in ops)
        # Bound on prompt tokens: the longest rendering with the longest names, items and operands, + margin.
        big = max(self.max_operand, 10)
        probe = [self._render(t, n, i, big, big) for _, t in self.templates for n in _NAMES for i in _ITEMS]
        self.max_prompt_len = max(len(self._encode(p)) for p in probe) + 8

    def _render(self, template: str, name: str, item: str, a: int, b: int) -> str:
        return template.format(n=name, i=item, a=a, b=b) + (" " + self.instruction if self.instruction else "")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.chat([{"role": "user", "content": text}])

    def example(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, int(index)])
        op, template = self.templates[rng.integers(len(self.templates))]
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        hi = self.max_operand if op != "*" else min(self.max_operand, 12)
        a, b = (int(x) for x in rng.integers(1, hi + 1, size=2))
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        text = self._render(template, name, item, a, b)
        return Example(int(index), tuple(self._encode(text)), answer, text)

    def reward(self, tokens, length, example):
        text = self.tokenizer.decode([int(t) for t in np.asarray(tokens)[:length]])
        return float(last_integer(text) == example.answer)

    def describe(self):
        return {"task": self.name, "seed": self.seed, "max_operand": self.max_operand, "ops": list(self.ops),
                "instruction": self.instruction}


# ---------------------------------------------------------------------------------------------------------
# The tiny from-scratch setting
# ---------------------------------------------------------------------------------------------------------
TINY_PAD, TINY_EOS, TINY_BOS = 0, 1, 2


def tiny_model_config(vocab_size: int = 16, **kw) -> ModelConfig:
    """A tiny Llama-style decoder that GRPO trains from scratch on a CPU in seconds."""
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_embeddings=False, name="tiny-rl",
                bos_id=TINY_BOS, eos_ids=(TINY_EOS,), pad_id=TINY_PAD)
    base.update(kw)
    return ModelConfig(**base)


class TinyCopyTask(Task):
    """Prompt `[BOS, x, r_1 .. r_k]` with `x` one of `symbols`; the answer is x. Reward: the fraction of the
    `max_new_tokens` completion positions holding x (tokens after an EOS count as wrong)."""

    name = "tiny"

    def __init__(self, vocab_size: int = 16, seed: int = 0, symbols: Sequence[int] = (4, 5, 6, 7),
                 noise_len: int = 2, max_new_tokens: int | None = None):
        symbols = tuple(int(s) for s in symbols)
        if not symbols or min(symbols) <= TINY_BOS or max(symbols) >= vocab_size:
            raise ValueError(f"symbols must lie in ({TINY_BOS}, {vocab_size}), got {symbols}")
        if noise_len < 0:
            raise ValueError(f"noise_len must be >= 0, got {noise_len}")
        self.vocab_size, self.seed, self.symbols, self.noise_len = int(vocab_size), int(seed), symbols, noise_len
        self.max_new_tokens = max_new_tokens
        self.max_prompt_len = 2 + noise_len

    def example(self, index):
        rng = np.random.default_rng([self.seed, int(index)])
        x = self.symbols[rng.integers(len(self.symbols))]
        noise = rng.integers(TINY_BOS + 1, self.vocab_size, size=self.noise_len).tolist()
        return Example(int(index), (TINY_BOS, x, *noise), x, f"copy {x}")

    def reward(self, tokens, length, example):
        tokens = np.asarray(tokens)
        width = self.max_new_tokens or len(tokens)
        return float((tokens[: min(length, width)] == example.answer).sum() / width)

    def describe(self):
        return {"task": self.name, "seed": self.seed, "vocab_size": self.vocab_size, "symbols": list(self.symbols),
                "noise_len": self.noise_len}


def make_task(name: str, *, tokenizer=None, config: ModelConfig | None = None, seed: int = 0,
              max_new_tokens: int | None = None, **kw) -> Task:
    """A task by name: "arithmetic" (needs a chat tokenizer) or "tiny" (token ids below config.vocab_size)."""
    if name == "arithmetic":
        return ArithmeticTask(tokenizer, seed=seed, **kw)
    if name == "tiny":
        vocab = config.vocab_size if config is not None else 16
        return TinyCopyTask(vocab, seed=seed, max_new_tokens=max_new_tokens, **kw)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")
