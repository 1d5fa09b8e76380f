"""Base loading from a diffusers folder, fingerprints, and adapter save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mdsd3_cli.model.adapter import AdapterError, read_adapter_config
from mdsd3_cli.model.weights import (
    BaseModelError,
    adapter_state_dict,
    build_model,
    build_tiny,
    describe_parameters,
    fresh_adapter_config,
    load_base,
    save_adapter,
)

from .helpers import CLASSES


def _trained_model(base, lora_rank=4):
    model, config = build_model(base, config=fresh_adapter_config(base, CLASSES, lora_rank=lora_rank))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            model.get_parameter(name).copy_(torch.randn(param.shape, generator=g))
    return model, config


def test_adapter_round_trip_is_bitwise(fresh_base, tmp_path):
    model, config = _trained_model(fresh_base)
    save_adapter(model, config, tmp_path / "adapter")
    loaded, loaded_config = build_model(build_tiny(), tmp_path / "adapter")
    assert loaded_config == config
    before, after = adapter_state_dict(model), adapter_state_dict(loaded)
    assert before.keys() == after.keys() and any("lora_A" in k for k in before)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_adapter_never_stores_base_weights(fresh_base, tmp_path):
    model, config = _trained_model(fresh_base)
    save_adapter(model, config, tmp_path / "adapter")
    names = load_file(str(tmp_path / "adapter" / "adapter.safetensors")).keys()
    assert all(n.startswith(("clean_pos_embed.", "clean_blocks.")) or "lora_" in n for n in names)
    assert "clean_pos_embed.pos_embed" not in names  # fixed buffer, rebuilt from the base
    counts = describe_parameters(model)
    assert counts["z_layers"] > 0 and counts["lora"] > 0 and counts["base"] > counts["clean_branch"]


def test_parameter_groups_add_up(fresh_base):
    """Disjoint groups: they sum to the model's total, and with trainable_only to what is trained."""
    model, _ = _trained_model(fresh_base)
    counts = describe_parameters(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or ".z_" in name)
    trained = describe_parameters(model, trainable_only=True)
    assert trained == {"base": 0, "clean_branch": 0, "z_layers": counts["z_layers"], "lora": counts["lora"]}
    assert sum(trained.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adapter_on_another_base_names_both(fresh_base, tmp_path):
    model, config = _trained_model(fresh_base)
    save_adapter(model, config, tmp_path / "adapter")
    other = build_tiny(seed=1)
    with pytest.raises(AdapterError) as error:
        build_model(other, tmp_path / "adapter")
    assert fresh_base.fingerprint in str(error.value) and other.fingerprint in str(error.value)


def test_adapter_with_wrong_shape_names_both(fresh_base, tmp_path):
    model, config = _trained_model(fresh_base)
    save_adapter(model, config, tmp_path / "adapter")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    raw["base_shape"]["num_layers"] = 24
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="shape .*num_layers.: 24.*tiny has shape"):
        build_model(fresh_base, tmp_path / "adapter")


def test_missing_adapter_files_name_their_path(fresh_base, tmp_path):
    with pytest.raises(AdapterError, match=str(tmp_path / "nowhere" / "adapter_config.json")):
        build_model(fresh_base, tmp_path / "nowhere")
    model, config = _trained_model(fresh_base)
    save_adapter(model, config, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(AdapterError, match=str(tmp_path / "adapter" / "adapter.safetensors")):
        build_model(fresh_base, tmp_path / "adapter")


def test_corrupt_adapter_config_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"classes": ["rain", "rain"]}')
    with pytest.raises(AdapterError, match="invalid adapter config .*adapter_config.json"):
        read_adapter_config(tmp_path)


def test_base_folder_round_trip(tmp_path):
    tiny = build_tiny()
    tiny.transformer.save_pretrained(tmp_path / "sd3" / "transformer")
    tiny.vae.save_pretrained(tmp_path / "sd3" / "vae")
    tiny.make_scheduler().save_pretrained(tmp_path / "sd3" / "scheduler")
    loaded = load_base(str(tmp_path / "sd3"))
    assert loaded.shape == tiny.shape
    assert loaded.fingerprint == load_base(str(tmp_path / "sd3")).fingerprint
    for name, tensor in tiny.transformer.state_dict().items():
        assert torch.equal(tensor, loaded.transformer.state_dict()[name])
    with pytest.raises(BaseModelError, match="not a diffusers-format SD3 folder: no vae/config.json"):
        (tmp_path / "sd3" / "vae" / "config.json").unlink()
        load_base(str(tmp_path / "sd3"))
    with pytest.raises(BaseModelError, match="not found"):
        load_base(str(tmp_path / "missing"))
