"""Logit parity with transformers (the oracle), f32 on CPU: the real SmolLM2 GGUF, and tiny random Llama / Qwen2
checkpoints that transformers writes (tied and untied heads, bf16 storage, sharding)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from er_jax.io.registry import load_model, smollm2_path
from er_jax.model import forward

ATOL = 1e-3


def er_jax_logprobs(model, ids):
    logits = forward(model.config, model.weights, jnp.asarray([ids], jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


def torch_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
    p = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                              dtype=torch.float32).eval()
    tk = smollm2.tokenizer
    prompts = [tk.encode("Hello"), tk.encode("The capital of France is"),
               tk.chat([{"role": "user", "content": "Write a haiku about the sea, then explain it in one line."}])]
    for ids in prompts:
        ours, want = er_jax_logprobs(smollm2, ids), torch_logprobs(hf, ids)
        assert np.abs(ours - want).max() <= ATOL, (len(ids), np.abs(ours - want).max())
        assert (ours.argmax(-1) == want.argmax(-1)).mean() > 0.95  # near-ties may flip; the values may not


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, eos_token_id=3, pad_token_id=0, bos_token_id=1)
CASES = {  # id -> (config, save dtype, max shard size)
    "qwen2-untied": (Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e6), torch.float32, None),
    "qwen2-tied": (Qwen2Config(**TINY, tie_word_embeddings=True), torch.float32, None),
    "llama-tied-head_dim32": (LlamaConfig(**TINY, tie_word_embeddings=True, head_dim=32, rope_theta=5e5),
                              torch.float32, None),
    "llama-untied-bf16-sharded": (LlamaConfig(**TINY, tie_word_embeddings=False), torch.bfloat16, "40KB"),
}


def random_model(config, seed=0):
    """A transformers model with large random weights (default init is near-uniform, which would hide bugs);
    norms near 1, q/k/v biases nonzero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_hf_checkpoint_matches_transformers(tmp_path, case):
    config, dtype, shard = CASES[case]
    random_model(config).to(dtype).save_pretrained(str(tmp_path), **({"max_shard_size": shard} if shard else {}))
    # The oracle: transformers' own load of the checkpoint, in f32 (weights maybe bf16-rounded, buffers not).
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = load_model(str(tmp_path))
    c = ours.config
    assert (c.qkv_bias, c.tie_embeddings, c.eos_ids, c.pad_id, c.bos_id) == \
        (case.startswith("qwen2"), config.tie_word_embeddings, (3,), 0, 1)
    assert ("lm_head" in ours.weights) != config.tie_word_embeddings
    rng = np.random.default_rng(1)
    for n in (1, 7, 33):
        ids = [int(i) for i in rng.integers(0, TINY["vocab_size"], n)]
        got, want = er_jax_logprobs(ours, ids), torch_logprobs(model, ids)
        assert np.abs(got - want).max() <= ATOL, (case, n, np.abs(got - want).max())
