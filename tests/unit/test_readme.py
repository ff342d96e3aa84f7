"""The README's two commands are the ones CI and newcomers run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_commands():
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    return re.findall(r"^    (python3 -m venv .+)$", text, flags=re.MULTILINE)


def test_readme_opens_with_a_demo_command_and_a_test_command():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("-m mailspool demo")
    assert tests.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = readme_commands()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
