from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_exactly_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    demo, tests = lines[1], lines[2]
    assert 'pip install -e ".[test]"' in demo and "normopt rewrite" in demo
    assert 'pip install -e ".[test]"' in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n '3p' README.md" in ci and 'bash -c "$test_command"' in ci
