from pathlib import Path

import pytest

from emae.config import load_config
from emae.errors import ConfigError
from tests.conftest import PARAMS, run_cli


def test_default_params_validate() -> None:
    config = load_config([PARAMS])
    assert config.num_patches == (config.data.image_size // config.model.patch_size) ** 2


@pytest.mark.parametrize("override,expected", [
    ("model.num_parts=5", r"model.num_parts=5 is not allowed .* K must be in 1..4"),
    ("model.patch_size=5", r"model.patch_size=5 does not divide data.image_size=32"),
    ("pretrain.epochs=0", r"pretrain.epochs = 0: Input should be greater than 0"),
    ("pretrain.epochs=many", r"pretrain.epochs = 'many': Input should be a valid integer"),
    ("model.mask_ratio=1.5", r"model.mask_ratio = 1.5: Input should be less than 1"),
    ("model.mask_ratio=0.99", r"model.mask_ratio=0.99 leaves no visible patch of the 16 .* at most 0.9375"),
    ("pretrain.betas=[0.9,1.5]", r"pretrain.betas.1 = 1.5: Input should be less than 1"),
    ("model.consistency_distance=l3", r"model.consistency_distance = 'l3': Input should be 'l1' or 'mse'"),
    ("model.embd_dim=3", r"model.embd_dim is not a known key"),
    ("model.num_heads=5", r"model.embed_dim=128 is not divisible by model.num_heads=5"),
    ("data.mean=[0.5]", r"data.mean=\[0.5\] and data.std=\[0.5, 0.5, 0.5\] need data.in_chans=3 values each"),
    ("wrong.key=1", r"unknown section 'wrong'"),
])
def test_bad_overrides_name_the_source_key_value_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        load_config([PARAMS], [override])
    assert f"override {override!r}" in str(err.value)


def test_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  blr: -1\n")
    with pytest.raises(ConfigError, match=rf"{bad}: pretrain.blr = -1"):
        load_config([PARAMS, bad])


def test_missing_key_and_missing_file(tmp_path: Path) -> None:
    partial = tmp_path / "model.yaml"
    partial.write_text("model:\n  patch_size: 4\n")
    with pytest.raises(ConfigError, match=r"model.embed_dim is missing"):
        load_config([PARAMS / "data.yaml", PARAMS / "pretrain.yaml", partial])
    with pytest.raises(ConfigError, match="params file or directory not found"):
        load_config([tmp_path / "nope.yaml"])


def test_cli_rejects_bad_params_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("pretrain", "-o", str(out), "model.num_parts=9", check=False)
    assert result.returncode == 2
    assert "model.num_parts=9 is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
