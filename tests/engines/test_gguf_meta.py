"""Our GGUF header reader against the ``gguf`` package's writer and reader, on real files."""

from __future__ import annotations

import pytest

from xdask.engines.gguf_meta import gguf_adds_bos, gguf_chat_template, read_gguf_metadata

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test file")


def test_reads_what_gguf_wrote(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(5000)])  # a long string array before the keys we want
    w.add_token_scores([0.5] * 5000)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_uint32("example.count", 7)
    import numpy as np

    w.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_chat_template(str(path)) == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert gguf_adds_bos(str(path)) is True
    ours = read_gguf_metadata(str(path), ("example.count", "tokenizer.ggml.tokens", "general.architecture"))
    theirs = gguf.GGUFReader(str(path))
    assert ours["example.count"] == theirs.get_field("example.count").contents() == 7
    assert ours["tokenizer.ggml.tokens"] == theirs.get_field("tokenizer.ggml.tokens").contents()
    assert ours["general.architecture"] == "llama"


def test_missing_keys_and_non_gguf_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    assert read_gguf_metadata(str(junk), ("tokenizer.chat_template",)) == {}
    assert gguf_chat_template(str(junk)) is None and gguf_adds_bos(str(junk)) is None
    assert read_gguf_metadata(str(tmp_path / "missing.gguf"), ("x",)) == {}


def test_the_packaged_gemma():
    from xdask.hub import locate_model
    from xdask.registry import resolve

    path = str(locate_model(resolve("gemma-3-270m", "ggufv2", None, "Q4_K_M")))
    assert gguf_adds_bos(path) is True
    assert gguf_chat_template(path) is None  # hence the family spec carries Gemma's template
