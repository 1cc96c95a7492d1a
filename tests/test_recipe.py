"""Recipe schema, overrides and the `dsvlm recipe` commands, including the bad inputs users make."""

import json
import logging
import re
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

import dsvlm
from dsvlm.cli.app import LIFECYCLE, app
from dsvlm.errors import RecipeError
from dsvlm.recipe import bundled_recipes, load_recipe
from dsvlm.recipe.load import recipe_path, recipes_dir
from dsvlm.recipe.schema import Recipe, _warn_renamed

runner = CliRunner()


def run_cli(*args: str):
    """Run the real console entry point: exit codes, streams and tracebacks as the interpreter leaves them."""
    return subprocess.run([sys.executable, "-m", "dsvlm", *args], capture_output=True, text=True)


def write_recipe(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(recipe_path("tiny-synthetic").read_text())
    mutate(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_validates(name):
    recipe = load_recipe(name)
    assert [s.name for s in recipe.stages] == ["align", "instruct"]
    assert recipe.description


@pytest.mark.parametrize("name", ["llava15-vicuna7b-ds", "llava15-vicuna7b-ds-lora", "siglip-qwen2-ds"])
def test_paper_recipes_have_a_baseline_by_one_override(name):
    recipe = load_recipe(
        name, ["supervision.enabled=false", "stages.0.train=[connector]", "stages.1.train=[connector,vision,llm]"]
    )
    assert not recipe.supervision.enabled


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_disabling_supervision_alone_gives_the_plain_llava_baseline(name, caplog):
    with caplog.at_level(logging.INFO, logger="dsvlm.recipe.schema"):
        recipe = load_recipe(name, ["supervision.enabled=false"])
    assert all("supervision" not in stage.train for stage in recipe.stages)
    assert all(stage.train for stage in recipe.stages)
    assert "no longer trains `supervision`" in caplog.text


def test_paper_recipe_matches_the_paper():
    recipe = load_recipe("llava15-vicuna7b-ds")
    align, instruct = recipe.stages
    assert (align.lr, align.global_batch_size) == (1e-3, 256)
    assert (instruct.lr, instruct.global_batch_size) == (2e-5, 128)
    assert recipe.supervision.vision_layers == [8, 16, 24]
    assert recipe.supervision.cross_attention == "moe"
    assert recipe.supervision.loss == {"perceptual": 1.0}
    assert recipe.supervision.weight == 1.0


def test_lora_recipe_is_the_paper_recipe_with_llava_lora_in_stage_two():
    paper, lora = load_recipe("llava15-vicuna7b-ds"), load_recipe("llava15-vicuna7b-ds-lora")
    adapter = lora.stages[1].llm_lora
    assert (adapter.rank, adapter.alpha, adapter.dropout, adapter.lr) == (128, 256, 0.05, 2e-4)  # finetune_lora.sh
    assert lora.stages[1].lr == 2e-5  # LLaVA's mm_projector_lr
    flat_paper, flat_lora = _flat(paper.model_dump()), _flat(lora.model_dump())
    differs = {k for k in flat_paper.keys() | flat_lora.keys() if flat_paper.get(k) != flat_lora.get(k)}
    assert {"stages.1.llm_lora" if k.startswith("stages.1.llm_lora") else k for k in differs} == {
        "description",
        "run.output_dir",
        "stages.1.llm_lora",
    }


def _flat(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return {k: v for i, value in enumerate(data) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def test_overrides_are_typed_and_applied():
    recipe = load_recipe(
        "tiny-synthetic",
        [
            "stages.0.lr=1e-4",
            "supervision.vision_layers=[1,2]",
            "run.seed=7",
            "supervision.loss={mae: 0.5, eps_mse: 1}",
        ],
    )
    assert recipe.stages[0].lr == 1e-4
    assert recipe.supervision.vision_layers == [1, 2]
    assert recipe.run.seed == 7
    assert recipe.supervision.loss == {"mae": 0.5, "eps_mse": 1.0}


def test_accumulation_from_global_batch():
    stage = load_recipe("llava15-vicuna7b-ds").stages[1]
    assert stage.accumulation_steps(world_size=8) == 1
    assert stage.accumulation_steps(world_size=2) == 4
    with pytest.raises(RecipeError, match="3 launched processes"):
        stage.accumulation_steps(world_size=3)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["model"].__setitem__("conector", "linear"), "model.conector: unknown key; did you mean"),
        (lambda d: d["stages"][0].__setitem__("lr", "fast"), "stages.0.lr: Input should be a valid number"),
        (lambda d: d["stages"][0].__setitem__("lr", -1), "stages.0.lr: Input should be greater than 0 (got -1)"),
        (lambda d: d["stages"][1].__setitem__("lr", 0), "stages.1.lr: Input should be greater than 0 (got 0)"),
        (lambda d: d["stages"][0].__setitem__("per_device_batch_size", 0), "stages.0.per_device_batch_size"),
        (lambda d: d["stages"][0].__setitem__("global_batch_size", 30), "not divisible by per_device_batch_size"),
        (lambda d: d.__setitem__("stages", []), "stages: List should have at least 1 item"),
        (lambda d: d["stages"][1].__setitem__("name", "align"), "stage name used twice: align"),
        (lambda d: d["supervision"].__setitem__("vision_layers", [2, 9]), "[9] exceed the vision encoder's depth (4"),
        (
            lambda d: (
                d["supervision"].__setitem__("enabled", False),
                d["stages"][0].__setitem__("train", ["supervision"]),
            ),
            "trains only `supervision` but supervision.enabled is false",
        ),
        (lambda d: d["supervision"].__setitem__("cross_attention", "mix"), "supervision.cross_attention: Input should"),
    ],
)
def test_bad_recipes_exit_2_with_the_field_path(tmp_path, mutate, expected):
    path = write_recipe(tmp_path, mutate)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert expected in str(err.value)
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "error:" in result.stderr and expected in " ".join(result.stderr.split())


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  connector: linear\n stages: [\n")
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2
    assert "line 3, column 2" in result.stderr
    assert "Traceback" not in result.output


def test_missing_recipe_path(tmp_path):
    result = runner.invoke(app, ["recipe", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "neither a file nor a bundled recipe" in result.stderr


def test_misspelt_bundled_name_gets_a_hint():
    with pytest.raises(RecipeError, match="did you mean 'tiny-synthetic'"):
        recipe_path("tiny-synthetc")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.0.warmup_ration=0.1", "stages.0.warmup_ration: unknown key; did you mean 'warmup_ratio'"),
        ("supervision.weight=heavy", "supervision.weight: Input should be a valid number"),
        ("run.seed", "must look like key.sub=value"),
        ("stages.5.lr=1", "'5' is not an index of a list of 2"),
    ],
)
def test_bad_overrides(override, expected):
    result = runner.invoke(app, ["recipe", "validate", "tiny-synthetic", override])
    assert result.exit_code == 2
    assert expected in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.output


def test_debug_lets_the_error_through_with_its_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "recipe", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and isinstance(result.exception, RecipeError)
    assert "error:" not in result.stderr  # not caught into the one-line message


def test_the_console_entry_point_as_a_process(tmp_path):
    """The one end-to-end check of `python -m dsvlm` itself (every other CLI test runs in process): a result
    alone on stdout with exit 0, a user error as one line on stderr with exit 2, and `--debug`'s traceback."""
    dest = tmp_path / "mine.yaml"
    copied = run_cli("recipe", "cp", "tiny-synthetic", str(dest))
    assert copied.returncode == 0 and copied.stdout == f"{dest}\n"
    refused = run_cli("recipe", "cp", "tiny-synthetic", str(dest))
    assert refused.returncode == 2 and not refused.stdout
    assert refused.stderr.startswith("error:") and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    debug = run_cli("--debug", "recipe", "validate", str(tmp_path / "nope.yaml"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "neither a file nor" in debug.stderr


def test_recipe_list_show_cp_schema(tmp_path):
    listed = runner.invoke(app, ["recipe", "list"])
    assert listed.exit_code == 0
    assert "tiny-synthetic" in listed.stdout.split()

    shown = runner.invoke(app, ["recipe", "show", "tiny-synthetic", "--resolved", "stages.0.lr=0.01"])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.stdout)["stages"][0]["lr"] == 0.01

    dest = tmp_path / "mine.yaml"
    copied = runner.invoke(app, ["recipe", "cp", "tiny-synthetic", str(dest)])
    assert copied.exit_code == 0 and copied.stdout.strip() == str(dest)
    assert load_recipe(str(dest)) == load_recipe("tiny-synthetic")
    again = runner.invoke(app, ["recipe", "cp", "tiny-synthetic", str(dest)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and not again.stdout

    schema = json.loads(runner.invoke(app, ["recipe", "schema"]).stdout)
    lr = schema["$defs"]["StageConfig"]["properties"]["lr"]
    assert lr["description"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"dsvlm {dsvlm.__version__}\n"


def _plain(kind: object) -> object:
    """`PositiveFloat` and other `Annotated[float, ...]` as `float`."""
    return typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind


def float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Override paths of every float field of the recipe schema: list sections by their first item, float
    mappings by their first allowed key."""
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        if origin is list:
            path, kinds = f"{prefix}{name}.0", typing.get_args(annotation)
        elif origin is dict:
            key, value = typing.get_args(annotation)
            allowed = typing.get_args(key) or ("key",)  # a Literal's values, or any key
            path, kinds = f"{prefix}{name}.{allowed[0]}", (value,)
        else:
            path, kinds = f"{prefix}{name}", typing.get_args(annotation) or (annotation,)
        for kind in map(_plain, kinds):
            if kind is float:
                paths.append(path)
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                paths += float_fields(kind, f"{path}.")
    return paths


FLOAT_FIELDS = float_fields(Recipe)


def test_the_float_field_walk_finds_the_known_ones():
    assert {"supervision.weight", "stages.0.lr", "stages.0.new_module_lr", "stages.0.max_grad_norm"} <= set(
        FLOAT_FIELDS
    )


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan"])
@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_infinite_and_nan_numbers_are_refused_naming_the_field(path, value):
    with pytest.raises(RecipeError, match=f"{re.escape(path)}: Input should be a finite number"):
        load_recipe("tiny-synthetic", [f"{path}={value}"])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"description: caf\xe9\n", "not UTF-8 text (byte 16)"),
        (b"description: a\x00b\n", "not a YAML text file: unacceptable character #x0000"),
    ],
)
def test_a_recipe_that_is_not_utf8_text_is_one_clean_error(tmp_path, content, expected):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.output


def test_a_recipe_with_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + recipe_path("tiny-synthetic").read_bytes())
    assert load_recipe(str(path)) == load_recipe("tiny-synthetic")


REMOTE = ["model.trust_remote_code=true", "model.llm.config=null", "model.llm.pretrained=someone/odd-llm"]


@pytest.mark.parametrize("command", [["recipe", "validate"], ["train"]])
def test_remote_code_is_named_before_it_can_run(tmp_path, command):
    extra = [f"data.dataset={tmp_path / 'none'}"] if command == ["train"] else []  # train stops at the data
    result = runner.invoke(app, [*command, "tiny-synthetic", *REMOTE, *extra])
    assert "trust_remote_code is on" in result.stderr and "someone/odd-llm" in result.stderr
    quiet = runner.invoke(app, [*command, "tiny-synthetic", *REMOTE[1:], *extra])
    assert "trust_remote_code" not in quiet.stderr


def test_help_lists_the_commands_in_lifecycle_order() -> None:
    result = CliRunner().invoke(app, ["--help"])
    listed = [
        line.split()[1]
        for line in result.stdout.splitlines()
        if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1] in LIFECYCLE
    ]
    assert listed == list(LIFECYCLE)


def test_what_a_library_prints_while_a_command_runs_goes_to_stderr(tmp_path, monkeypatch):
    # DeepSpeed's logger and lmms-eval's task reports print to stdout; a pipeline reading `--json` must not see it
    from dsvlm.cli import recipe as recipe_cli

    write = recipe_cli.atomic_write_text

    def noisy_write(*args, **kwargs):
        print("[WARNING] [real_accelerator.py] Setting accelerator to CPU.")
        return write(*args, **kwargs)

    monkeypatch.setattr(recipe_cli, "atomic_write_text", noisy_write)
    dest = tmp_path / "mine.yaml"
    result = runner.invoke(app, ["recipe", "cp", "tiny-synthetic", str(dest)])
    assert result.exit_code == 0
    assert result.stdout.strip() == str(dest)
    assert "Setting accelerator to CPU" in result.stderr
    assert "Usage" in runner.invoke(app, ["recipe", "cp", "--help"]).stdout  # help still goes to stdout


def test_the_old_perceptual_network_name_still_loads(tmp_path, caplog):
    """Runs saved before the rename hold `vae_encoder` in their recipe.yaml."""
    _warn_renamed.cache_clear()
    path = write_recipe(tmp_path, lambda d: d["supervision"].update(perceptual_network="vae_encoder"))
    with caplog.at_level(logging.WARNING, logger="dsvlm.recipe.schema"):
        assert load_recipe(str(path)).supervision.perceptual_network == "vae_features"
    assert "'vae_encoder' is now called 'vae_features'" in caplog.text
    with pytest.raises(RecipeError, match="perceptual_network"):
        load_recipe(str(write_recipe(tmp_path, lambda d: d["supervision"].update(perceptual_network="lpips"))))


def test_bundled_recipes_are_package_data_mirroring_the_top_level_folder():
    top = Path(__file__).resolve().parents[1] / "recipes"
    assert recipes_dir().parent == Path(dsvlm.__file__).parent  # found through the package, not sys.prefix
    assert recipes_dir().resolve() == top.resolve()  # in a checkout: the symlink to recipes/
    assert set(bundled_recipes()) == {p.stem for p in top.glob("*.yaml")}
    assert {p.name for p in (recipes_dir() / "accelerate").glob("*.yaml")} == {p.name for p in top.glob("accelerate/*")}


@pytest.mark.slow
def test_a_built_wheel_ships_every_recipe_inside_the_package(tmp_path):
    """The wheel, not only a checkout, holds recipes/ (so `pip install --user` and --target installs find them)."""
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    shutil.copytree(repo / "dsvlm", source / "dsvlm", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "recipes", source / "recipes")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    recipes = (repo / "recipes").rglob("*.yaml")
    shipped = {f"dsvlm/recipes/{p.relative_to(repo / 'recipes').as_posix()}" for p in recipes}
    assert shipped and shipped <= names
