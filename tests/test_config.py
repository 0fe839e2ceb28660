from pathlib import Path

import pytest
import yaml

from emae.config import load_config, load_yaml, merge_overrides, parse_override, read_yaml, save_config
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


# ---- params mean what was typed (YAML 1.2 core schema) and say each key once


def test_documented_spellings_validate_from_overrides() -> None:
    config = load_config([PARAMS], ["pretrain.amp=off", "model.norm_pix_loss=on", "pretrain.compile=off",
                                    "pretrain.deterministic=true", "pretrain.clip_grad=null"])
    assert config.pretrain.amp == "off"
    assert config.model.norm_pix_loss is True and config.pretrain.compile is False
    assert config.pretrain.deterministic is True and config.pretrain.clip_grad is None


def test_documented_spellings_validate_from_a_file(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("pretrain:\n  amp: off\n  compile: yes\n  deterministic: off\n  clip_grad: ~\n"
                       "model:\n  norm_pix_loss: on\n")
    config = load_config([PARAMS, overlay])
    assert config.pretrain.amp == "off"
    assert config.pretrain.compile is True and config.pretrain.deterministic is False
    assert config.pretrain.clip_grad is None and config.model.norm_pix_loss is True


def test_yaml_12_numbers_and_strings() -> None:
    text = "a: 1e-4\nb: 010\nc: 0x1f\nd: 1:30\ne: 2024-01-01\nf: NO\ng: .inf\nh: null\ni:\nj: [on, 2.5]\n"
    assert load_yaml(text, "t.yaml") == {"a": 1e-4, "b": 10, "c": 31, "d": "1:30", "e": "2024-01-01",
                                         "f": "NO", "g": float("inf"), "h": None, "i": None,
                                         "j": ["on", 2.5]}


def test_shipped_params_read_as_before() -> None:
    """The switch of schema changed no value of params/ (same values, same types)."""
    def typed(tree):
        if isinstance(tree, dict):
            return {k: typed(v) for k, v in tree.items()}
        return [typed(v) for v in tree] if isinstance(tree, list) else (type(tree), tree)

    for path in sorted(PARAMS.rglob("*.yaml")):
        assert typed(read_yaml(path)) == typed(yaml.safe_load(path.read_text())), path


def test_a_file_read_again_is_its_own_copy_and_its_current_content(tmp_path: Path) -> None:
    """read_yaml parses a content once per process: callers merge into what it returns, so each gets
    its own tree; an edited file is read anew; a broken one still says so every time."""
    path = tmp_path / "model.yaml"
    path.write_text("model:\n  betas: [0.9, 0.95]\n")
    first = read_yaml(path)
    first["model"]["betas"].append(0.0)
    assert read_yaml(path) == {"model": {"betas": [0.9, 0.95]}}
    path.write_text("model:\n  betas: [0.5, 0.5]\n")
    assert read_yaml(path) == {"model": {"betas": [0.5, 0.5]}}
    path.write_text("model: [1, 2\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
            read_yaml(path)


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  mask_ratio: 0.75\n  mask_ratio: 0.5\n", "model.mask_ratio", (2, 3)),
    ("model:\n  num_parts: 4\npretrain: {}\nmodel:\n  num_parts: 2\n", "model", (1, 4)),
    ("pretrain:\n  betas: [0.9, 0.95]\n  x: [{a: 1, a: 2}]\n", "pretrain.x.0.a", (3, 3)),
])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, key: str, lines: tuple[int, int]) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: duplicate key {key} on lines {lines[0]} and "
                                          rf"{lines[1]}: give each key once"):
        load_config([PARAMS, path])


def test_duplicate_key_in_an_override_and_merge_keys() -> None:
    with pytest.raises(ConfigError, match=r"override 'pretrain.betas=\{a: 1, a: 2\}': duplicate key "
                                          r"pretrain.betas.a"):
        load_config([PARAMS], ["pretrain.betas={a: 1, a: 2}"])
    # a key that overrides a `<<` merge is not a duplicate
    assert load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n", "m.yaml")["use"] == {"x": 3, "y": 2}


def test_saved_config_reads_back_unchanged(tmp_path: Path) -> None:
    config = load_config([PARAMS], ["pretrain.amp=off", "data.root='1.0e5'"])  # a path, quoted
    save_config(config, tmp_path / "config.yaml")
    assert read_yaml(tmp_path / "config.yaml") == config.to_dict()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["pretrain"]["amp"] == "off"  # YAML 1.1 too


def test_launcher_settings_read_the_same_way(tmp_path: Path) -> None:
    from emae.launch.config import load_launcher_config

    path = tmp_path / "launcher.yaml"
    path.write_text("launcher:\n  precheck: off\n  resources: {partition: gpu}\n")
    assert load_launcher_config(path).precheck is False
    assert load_launcher_config(None, ["precheck=off", "cancel_unschedulable=on"]).cancel_unschedulable
    path.write_text("launcher:\n  kind: local\n  kind: slurm\n")
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key launcher.kind on lines 2 and 3"):
        load_launcher_config(path)


def test_overrides_make_the_mappings_on_their_way() -> None:
    tree, origin = {"a": {"b": 1}, "n": None}, {}
    merge_overrides(tree, origin, ["a.c=[1, 2]", "n.x=1", "kind=slurm"], section="launcher")
    assert tree == {"a": {"b": 1}, "n": None, "launcher": {"a": {"c": [1, 2]}, "n": {"x": 1}, "kind": "slurm"}}
    merge_overrides(tree, origin, ["a.c=[1, 2]", "n.x=1"])
    assert tree["a"] == {"b": 1, "c": [1, 2]} and tree["n"] == {"x": 1}
    assert origin["a.c"] == "override 'a.c=[1, 2]'" and origin["launcher.kind"] == "override 'kind=slurm'"
    with pytest.raises(ConfigError, match=r"override 'a.b.c=1': a.b = 1 is not a mapping of keys"):
        merge_overrides(tree, origin, ["a.b.c=1"])
    with pytest.raises(ConfigError, match=r"override 'model': expected a dotted key=value"):
        merge_overrides(tree, origin, ["model"])


def test_pipeline_override_text_reads_back() -> None:
    from emae.workflow.stages import flatten

    items = flatten({"pretrain": {"amp": "off", "clip_grad": None, "betas": [0.9, 0.95]},
                     "data": {"root": "1.0e5"}})
    assert [parse_override(item)[1] for item in items] == ["off", None, [0.9, 0.95], "1.0e5"]
