import pytest
import yaml

from lorascope.config import StudyConfig
from lorascope.config_io import load_config, profiles, results_fingerprint, to_yaml
from lorascope.errors import InputError


@pytest.mark.parametrize("profile", profiles())
def test_every_profile_validates_and_round_trips(profile):
    config = load_config(None, profile)
    again = StudyConfig.model_validate(yaml.safe_load(to_yaml(config)))
    assert again == config
    assert results_fingerprint(again) == results_fingerprint(config)


def test_quick_profile_is_the_reference_grid():
    config = load_config()  # no file, no profile: quick
    assert config.name == "quick"
    assert list(config.tasks) == ["sst2", "mrpc", "rte"]
    assert config.methods == ["lora", "full"]
    assert config.seeds == [42, 1337, 2024]


def test_quick_tuned_is_quick_plus_a_small_search():
    quick, tuned = load_config(None, "quick"), load_config(None, "quick-tuned")
    assert tuned.tune.enabled and not quick.tune.enabled
    assert tuned.tune.startup_trials < tuned.tune.trials <= 5
    assert list(tuned.search_space("lora").params()) == ["lr", "alpha"]
    assert list(tuned.search_space("full").params()) == ["lr"]
    assert tuned.model_copy(update={"name": "quick", "tune": quick.tune}) == quick  # nothing else differs


def test_paper_profile_matches_the_reference_study():
    config = load_config(None, "paper")
    assert config.model.name == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    assert config.model.max_length == 384 and config.model.gradient_checkpointing
    assert config.training.lora.r == 8 and config.training.lora.target_modules == ["q_proj", "v_proj"]
    assert all(t.train_max is None for t in config.tasks.values())  # full train sets
    assert config.runtime.device == "cuda" and config.runtime.bf16


def test_set_overrides_are_typed():
    config = load_config(
        None, "smoke", ["training.lora.lr=3e-4", "seeds=[1, 2]", "training.lora.target_modules=[query]"]
    )
    assert config.training.lora.lr == pytest.approx(3e-4)
    assert isinstance(config.training.lora.lr, float)
    assert config.seeds == [1, 2]
    assert config.training.lora.target_modules == ["query"]


def test_config_file_overlays_the_profile(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("name: mine\ntraining:\n  full:\n    lr: 2.0e-5\n")
    config = load_config(path, "smoke")
    assert config.name == "mine"
    assert config.training.full.lr == pytest.approx(2e-5)
    assert config.training.full.batch_size == 16  # kept from the profile


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lora:\n    lr: 1.0e-3\n    lrr: 1.0e-3\n  full:\n    lr: 1.0e-3\n    lrr: 1.0e-3\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    # an adapter method's other keys are its PEFT config's fields, so PEFT's config is what refuses it
    assert "training.lora: 'lrr' is neither an optimiser hyperparameter nor a field of PEFT's LoraConfig" in str(
        err.value
    )
    assert "unknown key 'training.full.lrr' (did you mean 'lr'?)" in str(err.value)


def test_unknown_key_inside_a_task(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks:\n  sst2:\n    train_mx: 10\n")
    with pytest.raises(InputError, match=r"unknown key 'tasks.sst2.train_mx' \(did you mean 'train_max'\?\)"):
        load_config(path)


def test_wrong_type_is_reported_with_its_location():
    with pytest.raises(InputError, match=r"training.full.batch_size"):
        load_config(None, "smoke", ["training.full.batch_size=many"])


def test_set_on_a_missing_key_is_an_error():
    with pytest.raises(
        InputError, match=r"--set training.lora.alpah: no key 'alpah' in training.lora \(did you mean 'alpha'\?\)"
    ):
        load_config(None, "smoke", ["training.lora.alpah=4"])
    with pytest.raises(InputError, match="key=value"):
        load_config(None, "smoke", ["training.lora.lr"])


def test_bad_values_and_empty_grids_are_rejected():
    with pytest.raises(InputError, match="seeds"):
        load_config(None, "smoke", ["seeds=[]"])
    with pytest.raises(InputError, match="duplicates"):
        load_config(None, "smoke", ["seeds=[1, 1]"])
    with pytest.raises(InputError, match="methods"):
        load_config(None, "smoke", ["methods=[qlora]"])
    with pytest.raises(InputError, match="unknown profile 'fast'"):
        load_config(None, "fast")
    with pytest.raises(InputError, match="config file not found"):
        load_config("/nonexistent/study.yaml")


def test_fingerprint_tracks_results_not_presentation():
    base = load_config(None, "smoke")
    assert results_fingerprint(base) == results_fingerprint(load_config(None, "smoke", ["runtime.progress=false"]))
    assert results_fingerprint(base) != results_fingerprint(load_config(None, "smoke", ["training.full.lr=1e-5"]))


def test_glue_source_defaults_to_the_environment_where_the_study_runs(monkeypatch):
    monkeypatch.setenv("LORASCOPE_GLUE", "/data/glue")
    config = load_config(None, "smoke")
    assert config.data.glue is None and config.data.glue_source() == "/data/glue"
    assert "/data/glue" not in to_yaml(config)  # config.yaml keeps what was given, not this machine's path
    monkeypatch.delenv("LORASCOPE_GLUE")
    assert config.data.glue_source() == "nyu-mll/glue"
    assert load_config(None, "smoke", ["data.glue=/given"]).data.glue_source() == "/given"


def test_the_configuration_reference_is_generated_from_the_models():
    """docs/configuration.md is what `make docs` writes from the config models, key for key."""
    from pathlib import Path

    from lorascope.config_reference import render

    reference = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert reference.read_text() == render(), "docs/configuration.md is stale: run `make docs`"
    for key in ("model.max_length", "training.lora.r", "deploy.enabled", "runtime.workers", "tasks.<name>.train_max"):
        assert f"| `{key}` |" in reference.read_text()
