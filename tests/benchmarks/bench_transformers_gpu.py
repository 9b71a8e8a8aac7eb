"""Benchmark: xdask's transformers engine vs plain transformers, on a GPU (or, with --tiny, the CPU).

A randomly initialised model with Qwen2.5-0.5B's shape (bf16), a word-level
tokenizer over its 151,936 ids (so prompts have exact token counts and no
EOS ends a stream early), 128 concurrent streams of 128 prompt tokens -> 256
new tokens, and one stream alone. Printed side by side, same process, same run:

  * xdask engine (``TransformersEngine``: our continuous-batching scheduler),
    requests from 128 threads as the model actor sends them;
  * plain ``model.generate``: batch 1, and a static batch of all streams;
  * transformers' own continuous batching (``generate_batch``).

The engine module alone is measured (no Dask or HTTP: the GPU machine has
neither installed); the CPU benchmarks measure the HTTP path's overhead.
Writes results/transformers-gpu.json (README: Engines).

    python tests/benchmarks/bench_transformers_gpu.py [--streams 128] [--prompt 128] [--new 256]
    python tests/benchmarks/bench_transformers_gpu.py --tiny     # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def build_model(path: Path, shape: dict, dtype: str) -> None:
    """Random weights of ``shape`` and a byte-level BPE tokenizer over the whole vocabulary.

    No merges: each prompt character is one token (prompts are lowercase
    letters), and every other id decodes to ``tok<id>``. transformers 5
    loads Qwen2's own tokenizer class for this config, which reads exactly
    these files.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"tok{i}": i for i in range(len(vocab), shape["vocab_size"])})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="!").save_pretrained(path)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0, torch_dtype=dtype)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(path)
    GenerationConfig(eos_token_id=None, pad_token_id=0).save_pretrained(path)


def prompts(n: int, length: int) -> list[str]:
    """``n`` prompts of ``length`` lowercase letters (= ``length`` tokens each)."""
    import torch

    g = torch.Generator().manual_seed(1)
    letters = torch.randint(0, 26, (n, length), generator=g).tolist()
    return ["".join(chr(97 + c) for c in row) for row in letters]


def sync() -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def greedy_text(eng: Any, text: str, max_tokens: int) -> str:
    """What ``eng`` generates for ``text`` at temperature 0."""
    from xdask.engines.base import SamplingParams

    out: list = []
    eng.generate(text, SamplingParams(max_tokens=max_tokens, temperature=0), lambda d: out.append(d) and False)
    return "".join(d.text for d in out)


def bench_engine(path: Path, texts: list[str], new: int, device: str, dtype: str, max_batch: int,
                 layout: str) -> dict[str, Any]:
    """One engine variant: tokens/s of 1 stream and of all streams at once (one thread each), and its facts."""
    from xdask.engines.transformers import build_engine as make_engine

    kv_layout, _, variant = layout.partition("-")
    eng = make_engine(str(path), 32768, {"device": device, "dtype": dtype, "max_batch_size": max_batch,
                                         "max_prefill_tokens": 64 * 1024, "kv_layout": kv_layout,
                                         "max_model_len": 1024, "fuse_kernels": variant != "nofuse"})
    eng.load()
    complete = harness.engine_complete(eng)
    harness.warm_up(harness.on_prompts(complete, texts, 8))
    sync()
    res: dict[str, Any] = {"1": harness.run_threads(harness.on_prompts(complete, texts, new), 1, 1).tok_s}
    res[str(len(texts))] = harness.run_threads(harness.on_prompts(complete, texts, new), len(texts), len(texts)).tok_s
    res["max_rows"] = eng.stats["max_rows"]
    res["fused_kernels"] = ", ".join(eng.describe()["fused_kernels"]) or "none"
    res["greedy_text"] = greedy_text(eng, texts[0], 32)
    eng.close()
    return res


def bench_plain(path: Path, texts: list[str], new: int, device: str, dtype: str) -> dict[str, Any]:
    """Plain transformers: ``generate`` at batch 1 and as one static batch, and ``generate_batch``.

    Tokens are counted from the returned ids (``min_new_tokens`` = ``max_new_tokens``, no EOS).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ids = [AutoTokenizer.from_pretrained(path)(t).input_ids for t in texts]
    assert len({len(i) for i in ids}) == 1, "prompts must tokenize to equal lengths"

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    res: dict[str, Any] = {}
    one = torch.tensor(ids[:1], device=device)
    with torch.inference_mode():
        model.generate(one, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0))
        sync()
        t = time.perf_counter()
        out = model.generate(one, generation_config=cfg)
        sync()
        res["generate_batch1"] = (out.shape[1] - one.shape[1]) / (time.perf_counter() - t)
        batch = torch.tensor(ids, device=device)
        t = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=cfg)
        sync()
        res["generate_static"] = (out.shape[1] - batch.shape[1]) * len(ids) / (time.perf_counter() - t)
    try:  # generate_batch manages its own grad mode (it fails inside inference_mode)
        t = time.perf_counter()
        results = model.generate_batch(inputs=ids, generation_config=cfg)
        sync()
        total = sum(len(r.generated_tokens) for r in results.values())
        if total == 0:
            raise RuntimeError("no tokens generated (see the log above)")
        res["generate_batch"] = total / (time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - report, do not hide, an API that differs by version
        res["generate_batch"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    del model
    return res


def check_agreement(path: Path, texts: list[str], device: str, first: str, last: str) -> str:
    """How many of 4 prompts give the same 24 greedy tokens in float32 under two engine variants."""
    from xdask.engines.transformers import build_engine as make_engine

    answers = []
    for layout in (first, last):
        kv_layout, _, variant = layout.partition("-")
        eng = make_engine(str(path), 32768, {"device": device, "dtype": "float32", "max_batch_size": 8,
                                             "kv_layout": kv_layout, "max_model_len": 1024,
                                             "fuse_kernels": variant != "nofuse"})
        eng.load()
        answers.append([greedy_text(eng, text, 24) for text in texts[:4]])
        eng.close()
    same = sum(a == b for a, b in zip(*answers, strict=True))
    return f"{same}/4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke run)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--layouts", default="slots,slots-nofuse,dynamic-nofuse",
                        help="engine variants: KV layout, '-nofuse' for no fused kernels")
    parser.add_argument("--check", action="store_true",
                        help="float32: greedy tokens of the first variant equal the last one's (4 prompts)")
    harness.add_result_argument(parser, "transformers-gpu")
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":  # as the engine does: cuDNN attention re-plans for every new KV length
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = "bfloat16" if device == "cuda" else "float32"
    shape = TINY if args.tiny else QWEN25_05B
    if args.tiny:
        args.streams, args.prompt, args.new = min(args.streams, 8), min(args.prompt, 16), min(args.new, 16)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}  dtype {dtype}  shape {'tiny' if args.tiny else 'Qwen2.5-0.5B'}")
    print(f"streams {args.streams}, prompt {args.prompt} tokens, {args.new} new tokens each, greedy\n")
    layouts = args.layouts.split(",")
    figures: dict[str, Any] = {"streams": args.streams, "engine": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        build_model(path, shape, dtype)
        texts = prompts(args.streams, args.prompt)
        if not args.skip_plain:
            figures["plain"] = bench_plain(path, texts, args.new, device, dtype)
        for layout in layouts:
            figures["engine"][layout] = bench_engine(path, texts, args.new, device, dtype, max(args.streams, 1),
                                                     layout)
        if args.check:
            figures["check"] = check_agreement(path, texts, device, layouts[0], layouts[-1])
    rows = [[f"plain transformers: {k}", v] for k, v in figures.get("plain", {}).items()]
    rows += [[f"xdask engine ({layout}): {k}", v] for layout, res in figures["engine"].items() for k, v in res.items()]
    if args.check:
        rows.append(["float32 greedy agreement, first vs last variant", figures["check"]])
    harness.print_table(["tok/s (or what the row says)", ""], rows)
    harness.write_result(args.result, figures, benchmark="transformers-gpu", packages=["torch", "transformers"],
                         settings={"device": name, "dtype": dtype, "shape": "tiny" if args.tiny else "Qwen2.5-0.5B",
                                   "streams": args.streams, "prompt_tokens": args.prompt, "new_tokens": args.new,
                                   "layouts": layouts})
    os._exit(0)  # worker threads of compiled kernels can hold up a normal exit


if __name__ == "__main__":
    main()
