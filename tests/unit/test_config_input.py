"""Bad config input of every kind gets one UserError naming the key, the problem and the fix."""

import pytest

from megatron_lite.config import load_config
from megatron_lite.errors import UserError


def test_comma_lists_are_stripped_of_spaces(tmp_path):
    """`data.path='a, b'` read the prefix ' b' (a file name starting with a space)."""
    cfg = load_config(None, ["data.path= a , b,,c ", "data.weights=0.5, 0.3,0.2"])
    assert cfg.data.path == ["a", "b", "c"] and cfg.data.weights == [0.5, 0.3, 0.2]
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: a, b\n")
    assert load_config(f).data.path == ["a", "b"]


@pytest.mark.parametrize(
    "override",
    ["train.steps={", "train.steps=a: b: c", "model.layers='4", "train.steps=%x", "optim.lr=@", "train.steps=*a",
     "train.steps=!!python/object:x"],
)  # fmt: skip
def test_an_override_yaml_cannot_read_is_a_type_error_not_a_traceback(override):
    """Each raised PyYAML's own exception (a traceback from the CLI)."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^config key '{key}' expects (int|float), got "):
        load_config(None, [override])


def test_an_unclosed_flow_list_names_the_key_and_both_spellings():
    with pytest.raises(UserError, match=r"'data.path' got '\[a', which is not a YAML list .*data.path=a,b or"):
        load_config(None, ["data.path=[a"])


def test_a_comma_list_split_by_the_shell_says_to_quote_it():
    """`data.path=a, b` unquoted reaches us as two arguments, 'data.path=a,' and 'b'."""
    with pytest.raises(UserError, match=r"override 'b' is not .*quote a list with spaces \('data.path=a, b'\)"):
        load_config(None, ["data.path=a,", "b"])
