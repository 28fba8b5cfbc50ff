"""Tasks: deterministic example streams, exact answer checking, the SmolLM2 chat formatting, the tiny setting."""
import numpy as np
import pytest

from er_jax.rl.tasks import ArithmeticTask, TinyCopyTask, last_integer, make_task, tiny_model_config


class FakeTokenizer:
    """Characters as tokens, with a ChatML-like template."""

    def chat(self, messages):
        return self.encode(f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", 42), ("17 - 5 = 12", 12), ("no number here", None), ("-3", -3),
    ("so 1,234 apples", 1234), ("x=7, y=9,", 9), ("4 bags x 3 = 12 books in total", 12), ("", None)])
def test_last_integer(text, want):
    assert last_integer(text) == want


def test_arithmetic_examples_are_deterministic_and_correct():
    tok = FakeTokenizer()
    t = ArithmeticTask(tok, seed=5, max_operand=9)
    a, b = t.examples(10, 20), ArithmeticTask(tok, seed=5, max_operand=9).examples(10, 20)
    assert a == b and a[3] == t.example(13)
    assert ArithmeticTask(tok, seed=6, max_operand=9).examples(10, 20) != a
    for e in a:
        nums = [int(x) for x in __import__("re").findall(r"\d+", e.text)]
        x, y = nums[0], nums[1]
        assert e.answer in (x + y, x - y, x * y) and e.answer >= 0
        assert e.prompt == tuple(tok.chat([{"role": "user", "content": e.text}]))
        assert len(e.prompt) <= t.max_prompt_len
        assert e.text.endswith("Answer with a single number.")
    assert {t.example(i).answer == eval_op(t.example(i).text) for i in range(50)} == {True}


def eval_op(text):
    import re
    a, b = (int(x) for x in re.findall(r"\d+", text)[:2])
    if "more" in text or "puts in" in text:
        return a + b
    if "gives away" in text or "takes" in text:
        return a - b
    return a * b


def test_arithmetic_reward_exact_last_integer():
    tok = FakeTokenizer()
    t = ArithmeticTask(tok, seed=0)
    e = t.example(0)
    right = np.array(tok.encode(f"we compute... so the answer is {e.answer}") + [0] * 4)
    wrong = np.array(tok.encode(f"{e.answer} is close but it is {e.answer + 1}"))
    n_right = len(right) - 4
    assert t.reward(right, n_right, e) == 1.0
    assert t.reward(wrong, len(wrong), e) == 0.0
    assert t.reward(right, 5, e) == 0.0  # only the completion up to its length counts
    np.testing.assert_array_equal(t.rewards(np.stack([right[:20], right[:20]]), [20, 20], [e, e]).shape, (2,))


@pytest.mark.slow  # loads SmolLM2 (~13 s per worker); the lane loads it once, in test_io
def test_arithmetic_with_smollm2_chat_template(smollm2):
    t = make_task("arithmetic", tokenizer=smollm2.tokenizer, seed=0)
    e = t.example(0)
    text = smollm2.tokenizer.decode(list(e.prompt), skip_special_tokens=False)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert e.text in text and len(e.prompt) <= t.max_prompt_len
    ids = smollm2.tokenizer.encode(f"So the total is {e.answer}.")
    assert t.reward(np.array(ids), len(ids), e) == 1.0


def test_tiny_task():
    cfg = tiny_model_config()
    t = make_task("tiny", config=cfg, seed=1, max_new_tokens=4)
    e = t.example(3)
    assert e.prompt[0] == 2 and e.answer == e.prompt[1] and e.answer in t.symbols
    assert all(0 <= x < cfg.vocab_size for x in e.prompt) and len(e.prompt) == t.max_prompt_len
    x = e.answer
    assert t.reward(np.array([x, x, x, x]), 4, e) == 1.0
    assert t.reward(np.array([x, 1, 0, 0]), 2, e) == 0.25  # EOS after one correct token: the rest is forfeit
    assert t.reward(np.array([x, x, 0, 0]), 2, e) == 0.5
    assert t.examples(0, 5) == TinyCopyTask(16, seed=1).examples(0, 5)


def test_task_errors():
    with pytest.raises(ValueError, match="tokenizer"):
        make_task("arithmetic")
    with pytest.raises(ValueError, match="task must be"):
        make_task("chess")
    with pytest.raises(ValueError, match="symbols"):
        TinyCopyTask(8, symbols=(9,))
