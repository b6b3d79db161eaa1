"""The config keys DESIGN.md's "Interfaces other parts rely on" names, spelled as written there, in a
YAML file and as ``section.key=value`` overrides; an unknown key in any section, either way, is an
error naming that key."""

import pytest
import yaml

from megatron_lite.config import Config, load_config
from megatron_lite.errors import UserError

DESIGN_KEYS = {
    "model": "arch layers hidden heads kv_heads ffn_hidden vocab_size seq_len norm activation tie_embeddings "
    "rope_theta",
    "parallel": "tp pp vp dp sp schedule overlap_grad_reduce overlap_param_gather",
    "optim": "lr min_lr warmup weight_decay clip_grad distributed",
    "train": "steps micro_batch_size global_batch_size seed dtype recompute",
    "data": "path tokenizer",
    "checkpoint": "dir every keep resume async",
    "log": "dir every wandb tensorboard",
    "kernels": "backend",
}


@pytest.mark.parametrize("section", DESIGN_KEYS)
def test_every_design_key_loads_from_yaml_and_overrides_under_its_name(section, tmp_path):
    saved = Config().to_dict()[section]  # the spelling a saved config.yaml uses
    keys = DESIGN_KEYS[section].split()
    assert set(keys) <= set(saved), sorted(set(keys) - set(saved))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {k: saved[k] for k in keys}}))
    assert load_config(path).to_dict()[section] == saved


def test_checkpoint_async_is_spelled_async_in_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  async: true\n")
    assert load_config(path).checkpoint.async_ is True
    assert load_config(None, ["checkpoint.async=true"]).checkpoint.async_ is True
    assert load_config(path, ["checkpoint.async=false"]).checkpoint.async_ is False


@pytest.mark.parametrize("section", DESIGN_KEYS)
def test_an_unknown_key_in_any_section_is_an_error_naming_it(section, tmp_path):
    with pytest.raises(UserError, match=rf"unknown config key '{section}\.no_such_key'"):
        load_config(None, [f"{section}.no_such_key=1"])
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  no_such_key: 1\n")
    with pytest.raises(UserError, match=rf"^config file '.*c\.yaml': unknown config key '{section}\.no_such_key'"):
        load_config(path)
