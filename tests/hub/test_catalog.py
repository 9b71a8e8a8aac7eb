"""The built-in catalog: every shipped family file validates against its type's schema.

Pure functions, no processes. The negative cases show that the schema
catches what a hand edit gets wrong (an id, a field, a name, an ability)
with a message that names the problem.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest

from xdask.registry import MODEL_TYPES, list_families, resolve
from xdask.registry.builtins import (
    BUILTIN_FILES,
    builtin_catalog,
    check_unique_names,
    load_family_file,
)
from xdask.registry.specs import (
    FAMILY_CLASSES,
    HUB_ID_RE,
    EmbeddingFamily,
    LLMFamily,
    ModelSpec,
    ResolvedModel,
)

BUILTIN = Path(__file__).resolve().parents[2] / "xdask" / "registry" / "builtin"

#: LLM families allowed to have no Hugging Face or no ModelScope source: none today.
PYPI_ONLY: set[str] = set()


def _raw(model_type: str) -> list[dict]:
    return json.loads((BUILTIN / BUILTIN_FILES[model_type]).read_text(encoding="utf-8"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_shipped_file_validates(model_type):
    families = load_family_file(BUILTIN / BUILTIN_FILES[model_type], model_type)
    assert families, f"no {model_type} families shipped"
    assert all(f.model_type == model_type and f.is_builtin for f in families)
    assert [f.model_name for f in list_families(model_type)][: len(families)] == [f.model_name for f in families]


def test_counts_and_unique_names_across_types():
    catalog = builtin_catalog()
    assert len(catalog["LLM"]) >= 40
    assert len(catalog["embedding"]) >= 5 and len(catalog["rerank"]) >= 3
    assert len(catalog["image"]) >= 4 and len(catalog["audio"]) >= 5
    check_unique_names(f for fams in catalog.values() for f in fams.values())
    assert not set(BUILTIN_FILES.values()) ^ {p.name for p in BUILTIN.glob("*.json")}, "a file no type reads"


def test_every_llm_family_is_on_both_hubs():
    for fam in builtin_catalog()["LLM"].values():
        if fam.model_name in PYPI_ONLY:
            continue
        assert {"huggingface", "modelscope"} <= fam.hubs(), fam.model_name


def test_hub_ids_have_the_org_name_shape():
    for fams in builtin_catalog().values():
        for fam in fams.values():
            for spec in fam.model_specs:
                for source in spec.sources:
                    if source.hub != "pypi":
                        assert HUB_ID_RE.match(source.model_id), (fam.model_name, source.model_id)


def test_catalog_covers_the_formats_and_abilities_it_promises():
    llms = builtin_catalog()["LLM"].values()
    formats = {spec.model_format for fam in llms for spec in fam.model_specs}
    assert {"pytorch", "ggufv2", "awq", "gptq", "mlx", "fp8"} <= formats
    abilities = {a for fam in llms for a in fam.model_ability}
    assert {"chat", "generate", "vision", "tools", "reasoning"} <= abilities
    for fam in llms:
        if "reasoning" in fam.model_ability:
            assert fam.reasoning_start_tag and fam.reasoning_end_tag, fam.model_name
        for spec in fam.model_specs:
            if spec.model_format == "ggufv2":
                names = {spec.file_name(q) for q in spec.quantizations}
                assert len(names) == len(spec.quantizations), (fam.model_name, spec.model_file_name_template)


def test_well_known_families_are_there():
    names = {f.model_name for f in list_families("LLM")}
    for expected in ("qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "mistral-instruct-v0.3", "gemma-3-it",
                     "deepseek-r1-distill-qwen", "glm4-chat", "yi-1.5-chat", "phi-4"):
        assert expected in names
    assert "all-MiniLM-L6-v2" in {f.model_name for f in list_families("embedding")}
    assert {"bge-reranker-base", "bge-reranker-v2-m3"} <= {f.model_name for f in list_families("rerank")}
    assert {"sd-turbo", "FLUX.1-schnell"} <= {f.model_name for f in list_families("image")}
    assert {"whisper-tiny", "whisper-large-v3", "ChatTTS"} <= {f.model_name for f in list_families("audio")}


def test_default_embedding_model_ships_on_pypi():
    fam = builtin_catalog()["embedding"]["all-MiniLM-L6-v2"]
    assert isinstance(fam, EmbeddingFamily) and fam.dimensions == 384
    pypi = [s for s in fam.model_specs[0].sources if s.hub == "pypi"]
    assert pypi and pypi[0].module == "all_minilm_l6_v2" and pypi[0].archive == "model.zip"


def test_resolve_still_serves_the_default_and_the_qwen_specs():
    r = resolve("gemma-3-270m")
    assert (r.spec.model_format, r.spec.model_size_in_billions, r.quantization) == ("ggufv2", "0_27", "Q4_K_M")
    assert r.spec.file_name(r.quantization) == "gemma-3-270m-q4_k_m.gguf"
    assert r.spec.sources[0].hub == "pypi"
    assert ResolvedModel.model_validate(r.model_dump(mode="json")) == r  # what the worker gets back
    q = resolve("qwen2.5-instruct", "pytorch", "0_5", None)
    assert q.spec.sources[0].model_id == "Qwen/Qwen2.5-0.5B-Instruct" and q.family.chat_template is None
    mlx = resolve("qwen3", "mlx", "0.6", "8bit")
    assert [s.model_id for s in mlx.spec.sources if mlx.quantization in s.quantizations] == [
        "mlx-community/Qwen3-0.6B-8bit"
    ]


# -- negative cases: what a bad edit looks like --------------------------------------------


def _first(model_type: str) -> dict:
    return copy.deepcopy(_raw(model_type)[1 if model_type == "LLM" else 0])


def _error(cls: type, data: dict) -> str:
    with pytest.raises(pydantic.ValidationError) as err:
        cls.model_validate(data)
    return str(err.value)


@pytest.mark.parametrize("bad_id", ["Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5/0.5B", "Qwen/ Qwen", "-Qwen/x", "Qwen/"])
def test_a_wrong_hub_id_fails(bad_id):
    data = _first("LLM")
    data["model_specs"][0]["sources"][0]["model_id"] = bad_id
    assert "is not of the form 'Org/Name'" in _error(LLMFamily, data)


def test_a_missing_field_fails():
    data = _first("LLM")
    del data["model_specs"][0]["quantizations"]
    message = _error(LLMFamily, data)
    assert "model_specs.0.quantizations" in message and "Field required" in message
    data = _first("embedding")
    del data["dimensions"]
    assert "dimensions" in _error(EmbeddingFamily, data)


def test_an_unknown_field_fails():
    data = _first("LLM")
    data["stop_words"] = ["</s>"]  # a typo of "stop"
    assert "stop_words" in _error(LLMFamily, data) and "Extra inputs are not permitted" in _error(LLMFamily, data)


def test_an_unknown_ability_fails():
    data = _first("LLM")
    data["model_ability"] = ["chat", "telepathy"]
    assert "telepathy" in _error(LLMFamily, data)
    image = _first("image")
    image["model_ability"] = ["chat"]  # an LLM ability on an image model
    assert "not allowed for image models" in _error(FAMILY_CLASSES["image"], image)


def test_spec_rules():
    base = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
            "sources": [{"hub": "huggingface", "model_id": "org/name"}]}
    ModelSpec.model_validate(base)
    assert "model_format 'safetensors' is not one of" in _error(ModelSpec, {**base, "model_format": "safetensors"})
    assert "at least one" in _error(ModelSpec, {**base, "quantizations": []})
    gguf = {**base, "model_format": "ggufv2", "quantizations": ["Q4_K_M", "Q8_0"],
            "model_file_name_template": "model.gguf"}
    assert "must contain {quantization}" in _error(ModelSpec, gguf)
    assert "needs model_file_name_template" in _error(ModelSpec, {**gguf, "model_file_name_template": None})
    assert "needs sources" in _error(ModelSpec, {**base, "sources": []})
    stray = {**base, "sources": [{"hub": "huggingface", "model_id": "org/name", "quantizations": ["Int4"]}]}
    assert "does not offer" in _error(ModelSpec, stray)
    assert "absolute path" in _error(ModelSpec, {**base, "sources": [], "model_uri": "relative/dir"})
    assert ModelSpec.model_validate({**base, "sources": [], "model_uri": "file:///models/x"}).model_uri == "/models/x"


def test_a_duplicate_name_fails(tmp_path):
    data = _raw("LLM")[:2]
    data.append(copy.deepcopy(data[0]))
    path = tmp_path / "llm_families.json"
    path.write_text(json.dumps(data))
    families = load_family_file(path, "LLM")
    with pytest.raises(ValueError, match="model_name 'gemma-3-270m' is used twice"):
        check_unique_names(families)
    embedding = _first("embedding")
    embedding["model_name"] = "qwen3"  # an LLM's name on an embedding model
    with pytest.raises(ValueError, match="used twice"):
        check_unique_names([*builtin_catalog()["LLM"].values(), EmbeddingFamily.model_validate(embedding)])


def test_a_bad_file_names_the_family(tmp_path):
    data = _raw("LLM")[:2]
    data[1]["context_length"] = -1
    path = tmp_path / "llm_families.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"(?s)llm_families.json: family qwen2.5-instruct: .*context_length"):
        load_family_file(path, "LLM")
