"""The typed configuration: presets load, and every kind of mistake is refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from trainer.config import ConfigError, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo", "zootopia"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name


def test_zootopia_is_the_first_seeds_published_setting():
    cfg = load_config(CONFIGS / "zootopia.yaml")
    assert cfg.data.batch_size == 8 and cfg.data.crop_size == 480
    assert cfg.optim.lr_g == cfg.optim.lr_d == 1e-3
    assert (cfg.model.ngf, cfg.model.ndf) == (64, 32)
    assert cfg.loss.lambda_pixel == 20.0
    assert cfg.model.d_head.value == "patch" and cfg.loss.adversarial.value == "lsgan"
    assert cfg.train.epochs == 50


def test_overrides_apply_and_the_result_is_read_only():
    cfg = load_config(CONFIGS / "demo.yaml", ["data.batch_size=3", "model.ngf=8"])
    assert cfg.data.batch_size == 3 and cfg.model.ngf == 8
    with pytest.raises(ReadonlyConfigError):
        cfg.data.batch_size = 5


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("data:\n  shards: x\n  batch_sise: 4\n", ["data.batch_sise", "cfg.yaml"]),
        ("data:\n  shards: x\n  batch_size: four\n", ["data.batch_size", "cfg.yaml", "four"]),
        ("data:\n  shards: x\nmodel:\n  norm: layer\n", ["model.norm", "cfg.yaml", "layer"]),
        ("data:\n  shards: x\nbogus: 1\n", ["bogus", "cfg.yaml"]),
        ("data: [unclosed\n", ["cfg.yaml", "not valid YAML"]),
        ("model:\n  depth: 3\n", ["data.shards", "required"]),
        ("data:\n  shards: x\n  crop_size: 100\nmodel:\n  depth: 3\n", ["data.crop_size", "8"]),
        ("data:\n  shards: x\nmodel:\n  p_drop: 1.5\n", ["'model.p_drop'", "[0, 1]"]),
    ],
)
def test_mistakes_in_a_file_name_the_key_and_the_file(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("data.nope=1", "data.nope"), ("train.epochs=many", "train.epochs"), ("epochs", "key=value")],
)
def test_mistakes_on_the_command_line_name_the_override(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert needle in str(err.value) and override in str(err.value)


def test_missing_file_and_missing_shards_dir(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="data.shards.*no manifest.json"):
        load_config(CONFIGS / "demo.yaml", [f"data.shards={tmp_path}"], require_data=True)


def test_cli_prints_the_resolved_config_or_fails_with_exit_1(tmp_path):
    run = [sys.executable, "-m", "trainer.config", str(CONFIGS / "demo.yaml")]
    ok = subprocess.run([*run, "train.seed=7"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert OmegaConf.create(ok.stdout).train.seed == 7
    bad = subprocess.run([*run, "train.sede=7"], capture_output=True, text=True)
    assert bad.returncode == 1 and "train.sede" in bad.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.keep_checkpoints=0", ">= 1"),  # would delete every checkpoint once written
        ("train.keep_checkpoints=-2", ">= 1"),
        ("train.log_every=0", ">= 1"),
        ("train.grad_accum=0", ">= 1"),
        ("train.max_nonfinite=0", ">= 1"),
        ("data.num_threads=0", ">= 1"),
        ("train.max_steps=-5", ">= 0"),  # would write COMPLETE and export an untrained G
        ("train.image_every=-1", ">= 0"),
        ("train.val_every=-1", ">= 0"),
        ("train.checkpoint_every=-1", ">= 0"),
        ("optim.warmup_steps=-1", ">= 0"),
        ("optim.grad_clip=-0.5", ">= 0"),
        ("optim.grad_clip=inf", ">= 0"),
        ("optim.lr_g=-1e-4", "> 0"),
        ("optim.lr_d=0", "> 0"),
        ("optim.lr_d=nan", "> 0"),
        ("optim.beta1=1.0", "in [0, 1)"),
        ("optim.beta2=-0.1", "in [0, 1)"),
        ("data.brightness_jitter=1.0", "in [0, 1)"),
        ("data.brightness_jitter=-0.1", "in [0, 1)"),
        ("train.seed=-1", "in [0, 2**31)"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_key(override, expected):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert f"key '{key}': must be {expected}" in str(err.value)


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/x", ".", "a/../../b"])
def test_a_run_name_stays_inside_runs_dir(name):
    with pytest.raises(ConfigError, match="key 'name'"):
        load_config(CONFIGS / "demo.yaml", [f"name={name}"])


def test_the_edges_of_the_ranges_are_accepted():
    cfg = load_config(CONFIGS / "demo.yaml", [
        "train.keep_checkpoints=1", "train.max_steps=0", "train.image_every=0",
        "train.val_every=0", "train.checkpoint_every=0", "optim.grad_clip=0", "optim.beta1=0",
        "data.brightness_jitter=0", "train.seed=0", "name=group/run"])
    assert cfg.train.keep_checkpoints == 1 and cfg.name == "group/run"


def test_a_bad_value_stops_the_trainer_before_the_run_directory_exists(tmp_path, capsys):
    from trainer.main import main

    assert main(["--config", str(CONFIGS / "demo.yaml"), f"runs_dir={tmp_path / 'runs'}",
                 f"data.shards={tmp_path}", "train.keep_checkpoints=0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config error: key 'train.keep_checkpoints'" in err
    assert not (tmp_path / "runs").exists()


def test_mixed_precision_no_unquoted(tmp_path):
    # YAML reads `no` as false; the documented spelling must still mean fp32
    assert load_config(CONFIGS / "demo.yaml", ["train.mixed_precision=no"]).train \
        .mixed_precision.value == "no"
    path = write(tmp_path, "data:\n  shards: x\ntrain:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision.value == "no"
