"""The CLI's errors: a bad flag or setting is one line `eddy: error: ...` and exit status 2, never a
traceback or a boxed panel; the line names what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def eddy(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={"PATH": "/usr/bin:/bin", "EDDY_HOME": str(home)})


@pytest.mark.parametrize(("args", "says"), [
    (["up", "--zzz"], "No such option: --zzz (see `eddy up --help`)"),
    (["bench", "--loads", "x"], "give events/s as integers, e.g. 1000,5000"),
    (["up", "--engine", "foo"], "--engine: 'foo' is not one of faust, flink, native"),
    (["frob"], "No such command 'frob'"),
    (["query", "select 1", "--format", "xml"], "--format: 'xml' is not one of table, json, csv"),
    (["up", "--stages", "fused", "--engine", "faust"], "--stages: 'fused' is not one of auto, split, fused "
                                                       "(fused runs with --engine native)"),
    (["up", "--stages", "fused", "--scorers", "2"], "--scorers 2: scorer replicas run apart from the engine; "
                                                    "add --stages split"),
    (["run", "features-faust-0"], "unknown component 'features-faust-0'"),  # Faust has no workers of eddy's
    (["up", "--flink-cluster", "--engine", "native"], "--flink-cluster runs the Flink engine's job; drop --engine native"),
])
def test_a_bad_flag_is_one_line_and_status_2(tmp_path, args, says):
    done = eddy(*args, home=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eddy: error: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "╭" not in done.stderr and done.stdout == ""


def test_no_command_prints_the_help(tmp_path):
    done = eddy(home=tmp_path)
    assert done.returncode == 0 and "Usage: eddy" in done.stdout and "produce" in done.stdout


@pytest.mark.parametrize(("name", "runs"), [
    ("features-native-0", "features-native"), ("features-fused-0", "features-fused"),
    ("features-native", "features-native"), ("features-native-2", "features-native-2"), ("scorer-0", "scorer-0"),
])
def test_run_takes_a_workers_index_0_for_the_stage(tmp_path, monkeypatch, name, runs):
    """A StatefulSet's pods run `eddy run <stage>-<pod index>`: pod 0's features-native-0 is features-native."""
    from dataclasses import replace

    from deploy import cli, components

    ran: list[str] = []
    for comp in list(components.COMPONENTS.values()):
        monkeypatch.setitem(components.COMPONENTS, comp.name,
                            replace(comp, run=lambda settings, spec, n=comp.name: ran.append(n)))
    monkeypatch.setattr("deploy.cli_base.setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("EDDY_HOME", str(tmp_path))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        cli.main(["run", name])
    assert done.value.code == 0 and ran == [runs]


def test_the_cli_starts_without_torch_or_spark():
    """`eddy status` and the other light commands import no torch (1.8 s of the 2.1 s `import deploy.cli`
    took) and no pyspark: each command pulls in what it uses, inside it."""
    probe = ("import sys, deploy.cli, deploy.stack; "
             "print(sorted({'torch', 'pyspark', 'deltalake'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
