"""Loaders: bad inputs fail with clear ValueErrors; tokenizers match transformers token for token."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from er_jax.io import gguf as gguf_io
from er_jax.io import hf as hf_io
from er_jax.io import tokenizer as tok
from er_jax.io.registry import load_model, smollm2_path

# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="smollm2"):
        load_model("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="neither a known model name"):
        load_model(str(tmp_path / "missing.gguf"))


def test_truncated_gguf(tmp_path):
    with open(smollm2_path(), "rb") as fh:
        head = fh.read(1000)
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(tmp_path / "cut.gguf"))


@pytest.mark.slow
def test_truncated_gguf_data(tmp_path):
    # Header intact, tensor data cut off.
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(smollm2_path()) // 2))
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(cut))


def test_non_gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_text("this is not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(tmp_path / "model.gguf"))


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    path = str(tmp_path / "qwen.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'qwen2'.*only 'llama'"):
        load_model(path)


TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32, hidden_size=16,
            intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2)


def tiny_tensors(cfg):
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 4
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                  p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                  p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                  p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                  p + "mlp.down_proj.weight": (d, f)})
    return {k: np.ones(s, np.float32) for k, s in t.items()}


def write_dir(path, cfg=TINY, tensors=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    save_file(tiny_tensors(cfg) if tensors is None else tensors, os.path.join(path, "model.safetensors"))
    return str(path)


def test_handwritten_dir_loads(tmp_path):
    m = load_model(write_dir(tmp_path))
    assert m.tokenizer is None and m.config.eos_ids == (2,) and m.config.head_dim == 4
    assert m.weights["layers"]["wq"].shape == (2, 16, 16) and m.weights["lm_head"].shape == (16, 32)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ValueError, match="'MistralForCausalLM'.*supported: LlamaForCausalLM"):
        load_model(write_dir(tmp_path, dict(TINY, architectures=["MistralForCausalLM"], model_type="mistral")))


@pytest.mark.parametrize("rope", [dict(rope_scaling={"type": "linear", "factor": 2.0}),
                                  dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4})])
def test_rope_scaling_rejected(tmp_path, rope):
    with pytest.raises(ValueError, match="rope_scaling.*not supported"):
        load_model(write_dir(tmp_path, dict(TINY, **rope)))


def test_weight_shape_mismatch(tmp_path):
    t = tiny_tensors(TINY)
    t["model.layers.1.self_attn.k_proj.weight"] = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 16\), "
                                         r"expected \(8, 16\)"):
        load_model(write_dir(tmp_path, tensors=t))


def test_missing_and_unknown_tensors(tmp_path):
    t = tiny_tensors(TINY)
    del t["lm_head.weight"]
    with pytest.raises(ValueError, match="'lm_head.weight' is missing"):
        load_model(write_dir(tmp_path / "a", tensors=t))
    t = dict(tiny_tensors(TINY), **{"model.layers.0.self_attn.o_proj.bias": np.ones(16, np.float32)})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_model(write_dir(tmp_path / "b", tensors=t))


def test_truncated_safetensors(tmp_path):
    path = write_dir(tmp_path)
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_model(path)


def test_dir_without_weights_or_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(TINY, fh)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 metadata and tokenizer, against transformers' own GGUF loader

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "",  " ", "\n", "   leading", "trailing   ",
    "I'm sure they'll say it's fine, don't you? We've seen it.",
    "Café naïve résumé façade Ångström — “quotes” ‘and’ ellipsis…", "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ", "한국어 텍스트", "Россия и Україна", "مرحبا بالعالم", "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "a\n\n\tb   c \t\t\n  d\r\n", "x = 12345 + 3.14159 * 1,000,000 - 2024-01-01", "call 555-0199 or 0x1F",
    "def foo(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "SELECT * FROM t WHERE id=42;", "https://example.com/path?q=1&r=two#frag", "$$\\int_0^1 x^2\\,dx$$",
]
# SmolLM2 splits every digit off before the GPT-2 regex (its tokenizer.json: Digits + ByteLevel; llama.cpp:
# tokenizer.ggml.pre = "smollm"). transformers' GGUF converter ignores "smollm" and uses plain ByteLevel, which
# differs exactly when a run of >= 2 spaces precedes a digit: "  1" is [ĠĠ, 1] for SmolLM2, [Ġ, Ġ, 1] there.
DIGIT_AFTER_SPACES = ["  1", "x =  42", "    10 items\n        20 more"]


@pytest.fixture(scope="module")
def hf_tok():
    p = smollm2_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


@pytest.fixture(scope="module")
def hf_tok_smollm2():
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json."""
    t = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path()), gguf_file=os.path.basename(smollm2_path()))
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return t


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.name, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("smollm2-135m-instruct", 49152, 576, 30, 9, 3, 64)
    assert c.tie_embeddings and not c.qkv_bias and c.rope_theta == 100000.0 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    # GGUF: bos 1 (<|im_start|>, not prepended: add_bos_token false), eos 2 (<|im_end|>), pad 2; plus <|endoftext|>.
    assert (c.bos_id, c.eos_ids, c.pad_id) == (1, (2, 0), 2)
    t = smollm2.tokenizer
    assert (t.bos_id, t.eos_ids, t.pad_id, t.vocab_size) == (1, (2, 0), 2, 49152)
    assert "lm_head" not in smollm2.weights


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2, hf_tok, hf_tok_smollm2):
    t = smollm2.tokenizer
    for text in TEXTS:
        ids = t.encode(text)
        assert ids == hf_tok.encode(text) == hf_tok_smollm2.encode(text), text
        assert t.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
        assert t.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False), text
    for text in DIGIT_AFTER_SPACES:
        assert t.encode(text) == hf_tok_smollm2.encode(text), text
        assert t.decode(t.encode(text)) == text
    assert t.encode("  1") == [t.token_id("ĠĠ"), t.token_id("1")]


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Héllo 👋\n\tcode:  x = 1"}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "again"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smollm2, hf_tok, gen):
    t = smollm2.tokenizer
    for msgs in CONVERSATIONS:
        text = t.apply_chat_template(msgs, add_generation_prompt=gen)
        assert text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        if gen:
            want = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
            assert t.chat(msgs) == list(want["input_ids"])
    assert t.chat(CONVERSATIONS[0])[0] == 1 and t.chat(CONVERSATIONS[0])[-4:] == t.encode("<|im_start|>assistant\n")


@pytest.mark.slow
def test_tokenizer_from_hf_directory(tmp_path, smollm2, hf_tok_smollm2):
    # A tokenizer.json + tokenizer_config.json as transformers writes them round-trips to the same tokenizer.
    hf_tok_smollm2.save_pretrained(str(tmp_path))
    t = tok.from_hf_dir(str(tmp_path), {"bos_token_id": 1, "eos_token_id": 2})
    g = smollm2.tokenizer
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert t.encode(text) == g.encode(text), text
    for msgs in CONVERSATIONS:
        assert t.chat(msgs) == g.chat(msgs)
    assert (t.bos_id, t.eos_ids, t.pad_id, t.vocab_size) == (1, (2, 0), 2, 49152)


def test_gguf_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)
    w = np.arange(3 * 8 * 5).reshape(24, 5)
    permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(gguf_io.unpermute_rope(permuted, 3), w)
    np.testing.assert_array_equal(gguf_io.unpermute_rope(permuted[:, 0], 3), w[:, 0])


def test_bf16_safetensors_read_without_torch(tmp_path):
    """A hand-written BF16 file, read through the safetensors package (numpy, no torch)."""
    import ml_dtypes
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    raw = a.astype(ml_dtypes.bfloat16).view(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, raw.nbytes]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
    got = hf_io.read_safetensors(str(path))["w"][2]().astype(np.float32)
    np.testing.assert_array_equal(got, a.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.slow
def test_copied_gguf_path_loads_like_the_name(tmp_path, smollm2):
    # A .gguf path works like the registered name (only the config name differs).
    shutil.copy(smollm2_path(), tmp_path / "m.gguf")
    config, _, _ = gguf_io.load_gguf(str(tmp_path / "m.gguf"))
    assert config.replace(name=smollm2.config.name) == smollm2.config
