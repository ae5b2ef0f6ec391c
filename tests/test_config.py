"""Config tree <-> YAML round trip, recipes, --set overrides, and errors that name the bad key."""
import pytest
import yaml

from fdfast.config import Config, load_config, parse_override, recipe_names, validate
from fdfast.errors import FDFastError


def test_round_trip_is_exact():
    cfg = load_config("demo", {"optim.base_lr": 1e-4, "data.scale": [0.2, 1.0], "model.kwargs": {"qkv_bias": True}})
    again = Config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.data.scale == (0.2, 1.0) and again.optim.base_lr == 1e-4


def test_every_recipe_loads():
    assert "demo" in recipe_names()
    for name in recipe_names():
        cfg = load_config(name)
        assert cfg.recipe == name and cfg.optim.steps >= 1


def test_overrides_are_typed():
    key, value = parse_override("optim.steps=12")
    assert (key, value) == ("optim.steps", 12)
    cfg = load_config("demo", dict([parse_override("runtime.progress=false"), parse_override("teacher.weights=a.pt")]))
    assert cfg.runtime.progress is False and cfg.teacher.weights == "a.pt"


@pytest.mark.parametrize("overrides,match", [
    ({"optim.stpes": 3}, r"unknown config key 'optim.stpes' \(did you mean 'steps'\?\)"),
    ({"optm.steps": 3}, r"unknown config key 'optm' \(did you mean 'optim'\?\)"),
    ({"optim.steps": "many"}, r"'optim.steps' needs a whole number, got 'many'"),
    ({"optim.steps": 2.5}, r"whole number"),
    ({"data.scale": [0.1]}, r"needs 2 values"),
    ({"optim.steps": 0}, r"step count must be >= 1, got 0"),
    ({"ckpt.keep": 0}, r"ckpt.keep must be >= 1, got 0"),
    ({"optim.base_lr": 0}, r"optim.base_lr must be > 0"),
    ({"runtime.precision": "bf61"}, r"runtime.precision must be one of auto, fp32, bf16, fp16, got 'bf61' "
                                    r"\(did you mean 'bf16'\?\)"),
])
def test_bad_keys_and_values_name_the_key(overrides, match):
    with pytest.raises(FDFastError, match=match):
        load_config("demo", overrides)


def test_a_config_built_in_code_is_checked_too():
    cfg = Config()
    cfg.dist.strategy = "fsdq"
    with pytest.raises(FDFastError, match=r"dist.strategy must be one of auto, none, ddp, fsdp, got 'fsdq'"):
        validate(cfg)


def test_choice_values_and_warmup_are_normalised(capsys):
    cfg = load_config("demo", {"optim.fused": True, "optim.steps": 20, "optim.warmup_steps": 30})
    assert cfg.optim.fused == "true"  # YAML's boolean true is the choice "true", not "True"
    assert cfg.optim.warmup_steps == 2 and "warming up over 2 steps" in capsys.readouterr().err


def test_fd_and_finetune_recipes_are_kept_apart(tmp_path):
    assert not any(n.startswith("ft_") for n in recipe_names())
    with pytest.raises(FDFastError, match=r"is a fine-tuning recipe: run it with `fdfast finetune MODEL"):
        load_config(str(tmp_path / "ft_mine.yaml"))


def test_unknown_recipe_suggests_nearest():
    with pytest.raises(FDFastError, match=r"unknown recipe 'dem'.*did you mean 'demo'"):
        load_config("dem")


def test_bad_override_syntax():
    with pytest.raises(FDFastError, match="key=value"):
        parse_override("optim.steps")


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds_its_student_and_names_a_known_teacher(name):
    import torch

    from fdfast.models.student import build_student
    from fdfast.models.teachers import get_entry
    cfg = load_config(name)
    get_entry(cfg.teacher.name)  # raises for a name neither the registry nor timm knows
    with torch.device("meta"):
        student = build_student(cfg.model)
    params = sum(p.numel() for p in student.parameters())
    assert params > 5e6
    if name == "swinv2_g":
        assert 2.9e9 < params < 3.1e9


def test_each_choice_list_has_one_definition():
    """The config's Literal choices and the values the modules acting on them accept are the same objects."""
    import typing

    from fdfast import config, hostmem
    from fdfast.data import LOADERS
    from fdfast.runtime import PRECISIONS
    assert LOADERS == typing.get_args(config.Loader) and hostmem.SETTINGS == typing.get_args(config.Malloc)
    assert set(PRECISIONS) | {"auto"} == set(typing.get_args(config.Precision))
