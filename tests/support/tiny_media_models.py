"""Tiny random image and audio models written offline in their real on-disk formats (no hub here).

* ``build_tiny_sd``: a Stable Diffusion pipeline folder (``model_index.json``,
  UNet, VAE, CLIP text encoder, CLIP tokenizer, DDIM scheduler) that
  ``AutoPipelineForText2Image`` and ``AutoPipelineForImage2Image`` load;
  64x64 images take a fraction of a second on a CPU.
* ``build_tiny_whisper``: a multilingual Whisper (one layer each side, d=32)
  with a byte-level tokenizer that has Whisper's special tokens (three
  languages, the tasks, 1501 timestamp tokens), a 80-bin feature extractor and
  a generation config with ``lang_to_id``/``task_to_id``, alignment heads
  (word timestamps work) and ``max_new_tokens=24`` (a random model otherwise
  babbles up to the pipeline's 256 tokens, seconds on a CPU). FACTS.md: merges as tuples, special tokens through
  ``extra_special_tokens``, and special ids suppressed, or a random model
  predicts nothing but ``<|notimestamps|>``.
* ``build_tiny_vits``: an MMS-TTS-shaped VITS with a character vocabulary and
  a high ``speaking_rate`` (a random VITS speaks for ages otherwise).

Weights are random but seeded; safetensors files are made world-readable
(FACTS.md: safetensors writes 0600).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: Whisper languages the tiny model knows (a real one knows 99).
WHISPER_LANGUAGES = ("en", "fr", "de")


def _readable(path: Path) -> None:
    for weights in path.rglob("*.safetensors"):
        weights.chmod(0o644)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tiny_sd(path: Path | str, seed: int = 0) -> Path:
    """Write the tiny Stable Diffusion pipeline to ``path`` (idempotent) and return it."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=77,
    ))
    vocab = {"<|startoftext|>": 0, "<pad>": 1, "<|endoftext|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    # FACTS.md: without model_max_length=77 the pipeline raises OverflowError.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<pad>")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    _readable(path)
    return path


def build_tiny_whisper(path: Path | str, seed: int = 0) -> Path:
    """Write the tiny multilingual Whisper (model, tokenizer, feature extractor) to ``path`` and return it."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    byte_chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    specials = ["<|startoftranscript|>", *(f"<|{lang}|>" for lang in WHISPER_LANGUAGES), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # must follow <|notimestamps|>
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials + timestamps,
                                 unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ["<|endoftext|>", *specials]}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=128, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_new_tokens=24,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        suppress_tokens=[ids[token] for token in specials], begin_suppress_tokens=[eot],
        alignment_heads=[[0, 0], [0, 1]],
    )
    model.save_pretrained(path)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(path)
    _readable(path)
    return path


def build_tiny_vits(path: Path | str, seed: int = 0) -> Path:
    """Write the tiny VITS text-to-speech model (16 kHz, character vocabulary) to ``path`` and return it."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = ["<pad>", "<unk>", " ", *"abcdefghijklmnopqrstuvwxyz'.,?!-"]
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    tokenizer = VitsTokenizer(vocab_file=str(path / "vocab.json"), phonemize=False, add_blank=True, normalize=True)
    config = VitsConfig(
        vocab_size=len(chars), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
        flow_size=16, spectrogram_bins=33, upsample_initial_channel=16, upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=1, duration_predictor_filter_channels=16, depth_separable_num_layers=1,
        speaking_rate=4.0, sampling_rate=16000,
    )
    torch.manual_seed(seed)
    VitsModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    _readable(path)
    return path


def tone_wav(seconds: float = 2.0, rate: int = 44100, freq: float = 440.0, stereo: bool = False) -> bytes:
    """A sine tone as 16-bit PCM WAV bytes (written with ``wave``, independently of xdask's encoder)."""
    import io
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2")
    if stereo:
        samples = np.stack([samples, samples], axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2 if stereo else 1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()
