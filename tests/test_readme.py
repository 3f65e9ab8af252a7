"""The README's first two commands: (1) set up and run the main job, (2) set up and run the tests,
which must be exactly what CI runs."""

import os
import pathlib
import re
import subprocess
import json

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)][:2]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci], ".ci/run must run the README's test command verbatim"
    assert "regc compile" in main_cmd and "pytest" in test_cmd


@pytest.mark.slow
def test_readme_main_command_runs():
    """Runs README command 1 from the repository root. Outside CI the leading `pip install` is
    skipped so a developer's editable install is not switched to strict mode under their feet."""
    main_cmd, _ = readme_commands()
    cmd = main_cmd if os.environ.get("CI") else main_cmd.split("&&", 1)[1]
    out = ROOT / "out" / "digits"
    proc = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").is_file() and (out / "x86_64" / "meta.json").is_file()
    assert report["passes"][0]["pass"] == "fold_bn"
    assert report["quality"]["output_cosine"] > 0.99999
    assert "latency" in report and report["latency"]["ratio"] > 0
    assert "report:" in proc.stdout
