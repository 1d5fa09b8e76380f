"""Prompt rule and the prompt-embedding cache."""

from __future__ import annotations

import pytest
import torch

from mdsd3_cli.model import prompts as prompts_module
from mdsd3_cli.model.heads import all_prompts, prompt_for
from mdsd3_cli.model.prompts import PromptCache, load_prompt_embeddings

from .helpers import CLASSES


def test_prompt_rule_follows_adapter_order():
    assert prompt_for({"haze": 1.0, "rain": 0.3}, CLASSES) == "rain haze"
    assert prompt_for({"haze": 0.0}, CLASSES) == "clean"
    assert prompt_for({}, CLASSES) == "clean"
    assert len(all_prompts(CLASSES)) == 2 ** len(CLASSES) + 1  # every subset ("clean" for none) + ""


def test_cache_hit_never_constructs_text_encoders(tiny_base, tmp_path, monkeypatch):
    built = []
    real = prompts_module.tiny_text_encoder
    monkeypatch.setattr(prompts_module, "tiny_text_encoder", lambda *a, **k: built.append(1) or real(*a, **k))
    first = load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain", ""], tmp_path)
    assert built == [1]
    second = load_prompt_embeddings("tiny", tiny_base.fingerprint, ["", "rain"], tmp_path)
    assert built == [1], "a cache hit must not build the text encoders"
    for prompt in ("rain", ""):
        assert torch.equal(first[prompt].embeds, second[prompt].embeds)
    load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain", "haze"], tmp_path)
    assert built == [1, 1]  # only the miss triggers encoding


def test_cache_is_keyed_by_fingerprint_and_text(tmp_path):
    a, b = PromptCache(tmp_path, "base-a"), PromptCache(tmp_path, "base-b")
    assert a.path_for("rain") != b.path_for("rain") != a.path_for("haze")


def test_damaged_cache_entry_is_reencoded(tiny_base, tmp_path):
    load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain"], tmp_path)
    cache = PromptCache(tmp_path, tiny_base.fingerprint)
    cache.path_for("rain").write_bytes(b"garbage")
    assert cache.missing(["rain"]) == ["rain"]
    fresh = load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain"], tmp_path)
    assert fresh["rain"].embeds.shape[0] == 77 + 256


def test_distinct_prompts_embed_differently(tiny_prompts):
    assert not torch.equal(tiny_prompts["rain"].embeds, tiny_prompts["haze"].embeds)
    assert not torch.equal(tiny_prompts["rain"].pooled, tiny_prompts[""].pooled)


def test_missing_text_encoder_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        prompts_module.folder_text_encoder(tmp_path, "cpu", torch.float32)


def test_an_embedding_does_not_depend_on_which_prompts_were_missing_with_it(tiny_base, tmp_path):
    """A cold cache filled by `encode-prompts` (all prompts) or by a run needing one prompt gives equal bytes
    (batched encoding changed the pooled embedding's last bits, so outputs depended on the cache's history)."""
    alone = load_prompt_embeddings("tiny", tiny_base.fingerprint, [""], tmp_path / "one")
    together = load_prompt_embeddings("tiny", tiny_base.fingerprint, all_prompts(CLASSES), tmp_path / "all")
    assert torch.equal(alone[""].pooled, together[""].pooled) and torch.equal(alone[""].embeds, together[""].embeds)


def test_a_batch_encoded_cache_entry_of_an_older_version_is_reencoded(tiny_base, tmp_path):
    from safetensors.torch import save_file

    cache = PromptCache(tmp_path, tiny_base.fingerprint)
    load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain"], tmp_path)
    entry = load_prompt_embeddings("tiny", tiny_base.fingerprint, ["rain"], tmp_path)["rain"]
    save_file(
        {"embeds": entry.embeds, "pooled": entry.pooled}, str(cache.path_for("rain")), metadata={"prompt": "rain"}
    )
    assert cache.missing(["rain"]) == ["rain"]
