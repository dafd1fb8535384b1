"""Plugins (issue 11): modules named in a config, on the command line or by an installed package's entry point
register models, data sets and knowledge types before any registry is read; errors name the module and the
field; YAML itself never runs code; Ray workers get the same modules through the job's runtime environment."""
from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kdray import plugins
from kdray.config import ConfigError, RunConfig, load_config

_ids = itertools.count()


def _plugin(folder: Path, body: str = "") -> str:
    """A plugin module with a unique name (registries are per process) that registers one model."""
    name = f"user_plugin_{next(_ids)}_{id(folder) % 10_000}"
    (folder / f"{name}.py").write_text(textwrap.dedent(f'''
        from torch import nn
        from kdray.models import register_model

        @register_model("{name}_net", "user", (16,), "a plugin's model")
        def build(num_classes, input_shape, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    ''') + textwrap.dedent(body))
    return name


def _config(folder: Path, mods: list[str], student: str) -> Path:
    p = folder / "run.yaml"
    p.write_text(yaml.safe_dump({"plugins": mods, "dataset": {"name": "test_blobs"}, "student": {"name": student}}))
    return p


def test_a_plugin_next_to_the_config_registers_its_model_before_the_student_is_validated(tmp_path, monkeypatch):
    proj = tmp_path / "project"
    proj.mkdir()
    name = _plugin(proj)
    monkeypatch.chdir(tmp_path)  # neither the working directory nor sys.path holds the plugin: its config's folder does
    cfg = load_config(_config(proj, [name], f"{name}_net"))
    assert cfg.plugins == [name] and name in plugins.imported()
    from kdray import MODELS

    assert MODELS.origin(f"{name}_net") == f"plugin {name}"
    from kdray.check import dry_run

    assert dry_run(cfg).student_params == 16 * 8 + 8 + 8 * 3 + 3


def test_without_the_plugin_the_model_name_is_unknown_and_the_error_says_so(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, [], "not_registered_anywhere"))
    assert e.value.fields == ["student.name"] and "unknown model" in str(e.value)


def test_an_unimportable_plugin_names_the_file_the_field_and_the_module(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, ["test_mlp_missing_module"], "test_mlp"))
    assert e.value.fields == ["plugins.0"] and str(tmp_path / "run.yaml") in str(e.value)
    assert "'test_mlp_missing_module'" in str(e.value)


def test_a_plugin_that_fails_inside_reports_its_own_error(tmp_path):
    name = _plugin(tmp_path, "raise RuntimeError('database password not set')\n")
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, ["test_plugins", name], "test_mlp"))  # a second entry: the field index
    assert e.value.fields == ["plugins.1"] and "database password not set" in str(e.value)


def test_a_plugin_cannot_shadow_a_built_in_name(tmp_path):
    name = f"user_plugin_dup_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        from kdray.models import register_model
        register_model("resnet8", "user", (3, 32, 32))(lambda num_classes, input_shape: None)
    '''))
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, [name], "test_mlp"))
    assert "duplicate model name 'resnet8'" in str(e.value)


def test_file_paths_and_yaml_tags_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as e:
        RunConfig.model_validate({"plugins": ["../evil.py"], "student": {"name": "test_mlp"}})
    assert e.value.fields == ["plugins.0"] and "not a Python module name" in str(e.value)
    marker = tmp_path / "ran"
    p = tmp_path / "tagged.yaml"
    p.write_text(f"plugins: !!python/object/apply:os.system ['touch {marker}']\nstudent: {{name: test_mlp}}\n")
    with pytest.raises(ConfigError):
        load_config(p)
    assert not marker.exists()


def test_the_command_line_plugin_flag_works_before_and_after_the_command(tmp_path, monkeypatch, capsys):
    from kdray.cli import main

    monkeypatch.chdir(tmp_path)
    first, second = _plugin(tmp_path), _plugin(tmp_path)
    assert main(["--plugin", first, "list", "--plugin", second]) == 0
    out = capsys.readouterr().out
    assert f"{first}_net" in out and f"[plugin {second}]" in out
    assert main(["list", "--plugin", "no_such_plugin_module"]) == 2
    assert "field '--plugin'" in capsys.readouterr().err


def test_installed_packages_plug_in_through_the_entry_point_group(tmp_path, monkeypatch):
    name = _plugin(tmp_path)
    dist = tmp_path / "acme_kd-1.0.dist-info"  # what pip writes for a package declaring [project.entry-points]
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kd\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kdray.plugins]\nacme = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    from kdray import MODELS

    assert f"{name}_net" not in MODELS
    RunConfig.model_validate({"dataset": {"name": "test_blobs"}, "student": {"name": f"{name}_net"}})
    assert name in plugins.imported()


def test_the_runtime_environment_ships_local_plugins_and_imports_them_in_workers(tmp_path, monkeypatch):
    name = _plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    plugins.import_plugins([name], search=[tmp_path])
    env = plugins.runtime_env()
    assert str(tmp_path / f"{name}.py") in env["py_modules"]  # not installed: Ray must upload it to every node
    assert name in env["env_vars"][plugins.ENV].split(",")
    assert env["worker_process_setup_hook"] == "kdray.hooks.worker_setup"
    assert not any("site-packages" in p for p in env["py_modules"])  # torch, kdray... are installed everywhere
    # What a fresh worker process does with that environment (only the env var, the module on its path):
    import subprocess

    code = (f"import os; os.environ['{plugins.ENV}']='{name}'; import kdray.hooks as p; p.worker_setup(); "
            f"from kdray import MODELS; print('{name}_net' in MODELS)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.stdout.strip() == "True", r.stderr[-2000:]
