"""Tokenizers from a Hugging Face `tokenizer.json` or from a GGUF's vocabulary, with jinja2 chat templates.

Both end up as a `tokenizers.Tokenizer`. A GGUF stores no `tokenizer.json`, so its byte-level BPE is rebuilt
from `tokenizer.ggml.tokens` / `merges`, with the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# Tokens that end a chat turn or a document. A model may stop at any of them, whichever single id its file calls
# "eos": chat models end turns with <|im_end|> / <|eot_id|>, and base-model habits (<|endoftext|>) survive
# fine-tuning. Only tokens the vocabulary marks special count. SmolLM2: GGUF eos 2 (<|im_end|>), plus 0.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")

_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `tokenizer.ggml.pre` -> the pre-tokenizer of the model's own tokenizer.json.
GGUF_PRE_TOKENIZERS = {
    "default": lambda: _BYTE_LEVEL,
    "gpt2": lambda: _BYTE_LEVEL,
    "gpt-2": lambda: _BYTE_LEVEL,
    # SmolLM / StarCoder: every digit alone, then GPT-2's regex (HF SmolLM2 tokenizer.json: Digits + ByteLevel).
    **{pre: lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL])
       for pre in ("smollm", "starcoder", "refact")},
    **{pre: lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
       for pre in ("llama-bpe", "llama3", "llama-v3")},
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """Text <-> ids. `encode` adds the BOS token iff the model's tokenizer does; `chat` encodes the rendered
    template as is (the template writes any BOS itself), like transformers' `apply_chat_template`."""

    def __init__(self, backend: Backend, chat_template: str | None, special_tokens: dict[str, str | None],
                 bos_id: int | None, eos_ids, pad_id: int):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token / eos_token / ... strings, for the chat template
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in the GGUF / tokenizer_config.json); "
                             "encode a plain prompt instead")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special_tokens.items() if v is not None})

    def chat(self, messages) -> list[int]:
        return self.backend.encode(self.apply_chat_template(messages), add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _compile_template(source: str):
    """The template in the sandboxed jinja2 environment transformers renders chat templates in."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def end_ids(backend: Backend, declared) -> tuple[int, ...]:
    """The declared eos id(s) first, then every special END_TOKENS token of the vocabulary, without repeats."""
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    ids = [int(i) for i in declared if i is not None] + [special[t] for t in END_TOKENS if t in special]
    return tuple(dict.fromkeys(ids))


def from_gguf(meta: dict, source: str) -> Tokenizer:
    """A byte-level BPE tokenizer from a GGUF's `tokenizer.*` metadata (`meta`: key -> decoded value)."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') GGUF "
                         f"tokenizers are supported -- load the model's Hugging Face directory instead")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{source}: unknown tokenizer.ggml.pre {pre!r} (known: {sorted(GGUF_PRE_TOKENIZERS)}); "
                         f"load the model's Hugging Face directory instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token_of(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    (bos_id, bos), (eos_id, eos), (pad_id, pad), (_, unk) = (token_of(k) for k in ("bos", "eos", "padding", "unknown"))
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    eos_ids = end_ids(backend, [eos_id, meta.get("tokenizer.ggml.eot_token_id")])
    return Tokenizer(backend, meta.get("tokenizer.chat_template"),
                     {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk},
                     bos_id, eos_ids, pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0))


def listify(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def from_hf_dir(path: str, config: dict) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model directory (`tokenizer.json` + `tokenizer_config.json`), or None when
    the directory has no `tokenizer.json`. `config` is the parsed config.json (for the special token ids)."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        return None
    backend = Backend.from_file(tj)
    tc = _read_json(os.path.join(path, "tokenizer_config.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as fh:
            template = fh.read()

    def token_str(name):
        t = tc.get(name)
        return t.get("content") if isinstance(t, dict) else t

    special = {k: token_str(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def token_id(key, name):
        i = listify(config.get(key))
        return i[0] if i else (backend.token_to_id(special[name]) if special[name] else None)

    bos_id = token_id("bos_token_id", "bos_token")
    declared = listify(gen.get("eos_token_id")) + listify(config.get("eos_token_id"))
    if not declared and special["eos_token"]:
        declared = [backend.token_to_id(special["eos_token"])]
    eos_ids = end_ids(backend, declared)
    pad_id = token_id("pad_token_id", "pad_token")
    return Tokenizer(backend, template, special, bos_id, eos_ids,
                     pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
