"""``exoctl model build`` writes the local test model and prints the directory to deploy."""
import json

from exo_ctl.cli.main import main


def test_model_build_prints_the_directory_of_a_loadable_model(tmp_path, capsys):
    assert main(["model", "build", "--size", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "llama"


def test_model_build_with_an_unknown_size_is_a_usage_error(capsys):
    assert main(["model", "build", "--size", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
