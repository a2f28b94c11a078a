"""Every command the README and docs show parses as written: sims, make targets, benchmark scripts, helm, kubectl.

Commands are taken from the fenced shell blocks of README.md, docs/*.md and k8s/README.md (continuation lines
joined, pipelines and `&&` split, comments and redirections dropped). Each is parsed, never run: `sims` and
Python scripts by their own argparse parsers, make targets against the Makefile, helm and kubectl by the real
binaries with `--help` appended (cobra rejects an unknown command or flag before it prints help). A token naming
a file of this repository (a pipeline, values file, chart or kustomize folder) must exist.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sims_platform.cli import build_parser

sys.path.insert(0, str(Path(__file__).parent / "k8s"))
from tools import ensure_tools  # noqa: E402  (helm and kubectl, unpacked once into .tools/bin)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(sh|bash|console|shell)?\n(.*?)```", re.S)
PROGRAMS = ("sims", "make", "helm", "kubectl", "python")
# Repository paths a command may name; anything under them must exist (a URI or a path of the user's is not one).
REPO_PREFIXES = ("pipelines/", "charts/", "k8s/", "benchmarks/", "docs/", "values-")


def _segments(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, then split at pipes, `&&` and `;`."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        if "<<" in line:  # a here-document feeds code to an interpreter: a script, not a command line
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # the rest of a here-document
        cmd: list[str] = []
        for w in words + ["|"]:
            if w in ("|", "&&", ";", "||", "&"):
                if cmd:
                    out.append(shlex.join(cmd))
                cmd = []
            else:
                cmd.append(w)
    return out


def _strip(words: list[str]) -> list[str]:
    """Drop redirections (`> file`, `2>&1`) and a leading `.venv/bin/`; shell variables become a value."""
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"\d?>>?|<", w):
            skip = True
            continue
        if re.fullmatch(r"\d?>>?&?\S*", w):
            continue
        kept.append(w)
    # A shell variable (a loop's index, a revision read earlier) stands for a value of the user's: 0 parses as both.
    kept = [re.sub(r"\$\{?\w+\}?", "0", w) for w in kept]
    if kept and kept[0].startswith(".venv/bin/"):
        kept[0] = kept[0][len(".venv/bin/"):]
    return kept


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text()):
            for seg in _segments(m.group(2)):
                words = _strip(shlex.split(seg))
                if words and words[0] in PROGRAMS and not (words[0] == "python" and words[1:2] in (["-"], ["-c"])):
                    found.append((doc.relative_to(ROOT).as_posix(), words))
    return found


COMMANDS = doc_commands()


class _Parsed(Exception):
    pass


def _parse_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a script's argument parsing and stop right after it (its work never starts)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(_Parsed):
        runpy.run_path(str(ROOT / script), run_name="__main__")


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_the_docs_show_commands():
    programs = {words[0] for _, words in COMMANDS}
    assert {"sims", "make", "helm", "kubectl"} <= programs, programs
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("doc,words", COMMANDS, ids=[f"{d}:{' '.join(w)[:60]}" for d, w in COMMANDS])
def test_command_parses(doc, words, monkeypatch):
    program, args = words[0], words[1:]
    for w in args:
        path = w.split("=", 1)[-1]
        if path.startswith(REPO_PREFIXES) and not re.search(r"[<>*$]", path):
            assert (ROOT / path).exists(), f"{doc}: `{' '.join(words)}` names {path}, which does not exist"
    if program == "sims":
        try:
            build_parser().parse_args(args)
        except SystemExit as err:
            pytest.fail(f"{doc}: `{' '.join(words)}` does not parse (exit {err.code})")
    elif program == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in _make_targets()]
        assert not missing, f"{doc}: `{' '.join(words)}`: no make target {missing}"
    elif program == "python":
        assert args and args[0].endswith(".py"), f"{doc}: `{' '.join(words)}`: expected a script"
        _parse_script(args[0], args[1:], monkeypatch)
    else:
        proc = subprocess.run([str(ensure_tools() / program), *args, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, f"{doc}: `{' '.join(words)}`:\n{proc.stderr}"
