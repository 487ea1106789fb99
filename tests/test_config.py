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
        ("optim.lr_g=-1e-4", "> 0"),
        ("optim.lr_d=0", "> 0"),
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


@pytest.mark.parametrize(
    "override",
    ["loss.lambda_pixel=inf", "loss.lambda_temporal=1e999", "optim.grad_clip=inf",
     "optim.lr_d=nan", "model.p_drop=nan", "data.canny_high=-inf", "train.dist_timeout_min=inf"],
)
def test_every_float_key_must_be_finite(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert str(err.value).startswith(f"key '{key}': must be a finite number")


def test_an_infinite_weight_in_a_yaml_file_is_refused_naming_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "data:\n  shards: x\nloss:\n  lambda_adv: .inf\n")
    with pytest.raises(ConfigError, match="key 'loss.lambda_adv': must be a finite number"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.dist_timeout_min=1e-9", "key 'train.dist_timeout_min': must be >= 1/60"),
     ("model.scheduled_sampling=0.7",
      "key 'model.scheduled_sampling': must be <= 1 - p_drop = 0.5"),
     ("data.canny_high=0.05", "key 'data.canny_high': must lie in (data.canny_low = 0.1, 1]")],
)
def test_values_that_make_no_sense_are_refused_in_one_sentence_naming_one_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert str(err.value).startswith(message)
    assert str(err.value).count("key '") == 1


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path):
    # a million channels: about 40 PB of weights; the estimate runs on the meta device, so the
    # check itself allocates nothing (a real build would die trying to allocate them)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    run = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", str(CONFIGS / "demo.yaml"),
         f"runs_dir={tmp_path / 'runs'}", f"data.shards={shards}", "model.ngf=1000000"],
        capture_output=True, text=True, cwd=CONFIGS.parent, timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("config error: key 'model.ngf': 1000000 needs at least")
    assert run.stderr.count("\n") == 1 and "lower model.ngf" in run.stderr
    assert not (tmp_path / "runs").exists()


def test_the_fit_check_names_the_batch_when_activations_are_what_cannot_fit():
    from trainer.config import check_fits

    cfg = load_config(CONFIGS / "demo.yaml", ["data.batch_size=64"])
    check_fits(cfg)  # fits this host
    # about 9 MB of weights and 130 MB of activations: 100 MiB holds the one, not the other
    with pytest.raises(ConfigError, match=r"key 'data.batch_size': 64 needs at least .* activ"):
        check_fits(cfg, available=100 * 2**20)
