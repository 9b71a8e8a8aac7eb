"""Tiny random models written offline in real on-disk formats (no hub here).

``build_tiny_qwen2`` writes a Qwen2-architecture causal LM (hidden 128, two
layers, four heads of 32: vLLM's CPU attention refuses a head size of 16)
with a byte-level BPE tokenizer trained on the spot, a ChatML chat
template, safetensors weights, ``config.json`` and ``generation_config.json``:
the files ``save_pretrained`` writes for a real Qwen2.5 checkpoint. The
same directory loads in transformers, vLLM and mlx-lm, so it is the
cross-engine conformance fixture. Weights are random but seeded: greedy
decoding is deterministic, and the larger ``initializer_range`` makes the
logits peaked enough that float rounding differences between engines do not
flip the argmax.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2.5's chat template, reduced to the ChatML part (no tools).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "Dask schedules tasks on workers; a model is a long-lived actor.",
    "Write a short story about a dragon, a robot and a sailor.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "You are a helpful assistant. What is the capital of France? Paris.",
] * 20


def build_tokenizer(path: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.save_pretrained(path)


def build_tiny_qwen2(path: Path | str, seed: int = 0, layers: int = 2, hidden: int = 128) -> Path:
    """Write the tiny Qwen2 model to ``path`` (idempotent) and return it."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad).save_pretrained(path)
    for weights in path.glob("*.safetensors"):  # safetensors writes 0600 (FACTS.md)
        weights.chmod(0o644)
    (path / "xdask_fixture.json").write_text(json.dumps({"kind": "tiny-qwen2", "seed": seed}))
    return path


_RERANK_CORPUS = [
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Bananas are yellow fruit rich in potassium; monkeys and people eat them.",
    "The stock market fell today as investors sold technology shares.",
    "Dask distributes Python computations over a cluster of workers.",
    "A cross encoder reads the query and the document together and scores the pair.",
] * 20


def build_wordpiece_tokenizer(path: Path, vocab_size: int = 400, model_max_length: int = 128) -> None:
    """Train a BERT WordPiece tokenizer offline and save it as a fast HF tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_RERANK_CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                                      show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    ).save_pretrained(path)


def build_tiny_cross_encoder(path: Path | str, seed: int = 0) -> Path:
    """A tiny random BERT cross-encoder (one relevance label) in HF format, idempotent.

    ``initializer_range=0.2`` spreads the scores (the default init gives every
    pair ~0.5025: FACTS.md), so sorting by score is meaningful in tests.
    """
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    build_wordpiece_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=1, initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(path, safe_serialization=True)
    for weights in path.glob("*.safetensors"):  # safetensors writes 0600 (FACTS.md)
        weights.chmod(0o644)
    (path / "xdask_fixture.json").write_text(json.dumps({"kind": "tiny-cross-encoder", "seed": seed}))
    return path
