import json
from pathlib import Path

import pytest

from reprolora.core import config
from reprolora.core.errors import ReproloraError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_builtin_default_follows_the_reference_study():
    c = config.load(None)
    assert (c.seed, c.lora.r, c.lora.alpha, c.lora.dropout, c.train.epochs) == (42, 16, 32, 0.1, 1)
    assert c.base_model.path == "" and c.dataset.path == ""


def test_file_overrides_only_what_it_names(tmp_path):
    c = config.load(write(tmp_path, "seed = 7\n[train]\nlearning_rate = 5e-4\n"))
    assert (c.seed, c.train.learning_rate, c.lora.r) == (7, 5e-4, 16)


def test_relative_paths_are_relative_to_the_file(tmp_path):
    c = config.load(write(tmp_path, '[dataset]\npath = "data/x.jsonl"\n[base_model]\npath = "/abs/model"\n'))
    assert c.dataset.path == str(tmp_path / "data" / "x.jsonl")
    assert c.base_model.path == "/abs/model"


def test_integer_is_accepted_where_a_number_is_expected(tmp_path):
    assert config.load(write(tmp_path, "[train]\nlearning_rate = 1\n")).train.learning_rate == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[lora]\nrank = 8\n", "unknown key 'lora.rank' (did you mean 'lora.r'?)"),
        ("sed = 1\n", "unknown key 'sed' (did you mean 'seed'?)"),
        ("[trian]\nepochs = 1\n", "unknown key 'trian' (did you mean 'train'?)"),
        ('[lora]\nr = "16"\n', "'lora.r' must be an integer, got str '16'"),
        ("[lora]\nr = true\n", "'lora.r' must be an integer"),
        (
            '[lora]\ntarget_modules = "q_proj"\n',
            "'lora.target_modules' must be a list of module names or one of the presets attention, all-linear, "
            "got 'q_proj'",
        ),
        ("[lora]\ntarget_modules = 3\n", "'lora.target_modules' must be a list of strings or a string, got int 3"),
        ('[lora]\ntarget_modules = [""]\n', "'lora.target_modules' must not hold an empty name"),
        ("[lora]\ntarget_modules = [1]\n", "'lora.target_modules'[0] must be a string"),
        ("lora = 3\n", "'lora' must be a table"),
        ("[lora]\nr = 0\n", "'lora.r' must be at least 1"),
        ("[lora]\ndropout = 1.0\n", "'lora.dropout' must be in [0, 1)"),
        ("[dataset]\neval_fraction = 0\n", "'dataset.eval_fraction' must be between 0 and 1"),
        ('[train]\nlr_schedule = "step"\n', "'train.lr_schedule' must be one of cosine, linear, constant"),
        ("[train]\nlearning_rate = nan\n", "'train.learning_rate' must be a finite number"),
        ('profile = "fast"\n', "'profile' must be one of native, portable"),
        ("threads = 0\n", "'threads' must be between 1 and 256"),
        ("seed = \n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ReproloraError) as error:
        config.load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ReproloraError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_set_overrides_any_key_after_the_file(tmp_path):
    c = config.with_overrides(
        config.load(write(tmp_path, "seed = 7\n[train]\nepochs = 2\n")),
        ["train.epochs=3", "profile=portable", 'lora.target_modules=["q_proj"]', "train.learning_rate=1e-3", "seed=9"],
    )
    assert (c.seed, c.train.epochs, c.profile, c.lora.target_modules, c.train.learning_rate) == (
        9,
        3,
        "portable",
        ["q_proj"],
        1e-3,
    )
    assert c.lora.r == 16  # untouched keys keep the file's (or the default's) value
    assert config.with_overrides(c, []) is c


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.epoch=2", "--set: unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("train.epochs=two", "--set: 'train.epochs' must be an integer, got str 'two'"),
        ("train.epochs=0", "--set: 'train.epochs' must be at least 1, got 0"),
        ("seed", "--set 'seed': expected KEY=VALUE"),
        ("seed.x=1", "--set 'seed.x=1': 'seed' is a value, not a table"),
    ],
)
def test_bad_set_names_the_key_and_problem(item, message):
    with pytest.raises(ReproloraError) as e:
        config.with_overrides(config.load(None), [item])
    assert message in str(e.value)


def test_set_reaches_the_trained_job(train_tiny, tmp_path):
    out = tmp_path / "adapter"
    train_tiny(out, "--set", "train.epochs=1", "--set=seed=7")
    recorded = json.loads((out / "manifest.json").read_text())["inputs"]["config"]
    assert (recorded["train"]["epochs"], recorded["seed"]) == (1, 7)
