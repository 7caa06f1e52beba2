"""The documentation tells the truth: every ```python block of README.md and docs/*.md runs, the
performance tables equal scripts/perf_table.py's output for the committed benchmark JSON, relative
links point at files that exist, and the README stays a front page (<= 300 lines).

Each code block runs in its own Python process from a fresh temporary directory (so blocks cannot
lean on each other or on the working directory). A block that reads ``../shared/data`` skips when
that folder is absent. A block is left out only with a first line ``# doc-test: skip (reason)``.
"""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import perf_table  # noqa: E402

PERF_JSON = os.path.join(ROOT, "bench", "results", "cpu.json")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
SKIP = re.compile(r"^#\s*doc-test:\s*skip\s*\((.+)\)\s*$")


def doc_files():
    docs = os.path.join(ROOT, "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md"] + [os.path.join("docs", f) for f in names]


def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def python_blocks():
    blocks = []
    for rel in doc_files():
        text = read(rel)
        for m in FENCE.finditer(text):
            if m.group(1) != "python":
                continue
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(pytest.param(rel, line, m.group(2), id=f"{rel}:{line}"))
    return blocks


def test_docs_have_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("rel,line,code", python_blocks())
def test_python_block_runs(rel, line, code, tmp_path):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    skip = SKIP.match(first)
    if skip:
        pytest.skip(f"{rel}:{line} marked not runnable: {skip.group(1)}")
    if "../shared/data" in code or "shared/data" in code:
        if not os.path.isdir(DATA):
            pytest.skip("../shared/data is absent (real scans not available)")
        # blocks name the data relative to the repository root, as the docs' commands do
        code = code.replace("../shared/data", DATA)
    if "TRITON_INTERPRET" in code:
        if importlib.util.find_spec("triton") is None:  # not imported here: the block sets TRITON_INTERPRET first
            pytest.skip("triton is not installed (the [gpu] extra)")
    env = dict(os.environ)
    env.pop("SPCONV_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the code block at {rel}:{line} failed:\n{proc.stderr[-3000:]}"


def test_perf_json_is_committed():
    assert os.path.isfile(PERF_JSON), "bench/results/cpu.json (the figures of the docs) is missing"


@pytest.mark.parametrize("rel", [rel for rel in doc_files() if perf_table.marked_parts(read(rel))])
def test_perf_tables_equal_the_script_output(rel):
    parts = perf_table.marked_parts(read(rel))
    data = perf_table.load(PERF_JSON)
    for name, content in parts:
        assert content == perf_table.render(data, name), (
            f"{rel}: the '{name}' performance part differs from `python scripts/perf_table.py --part {name}`; "
            f"regenerate with `python scripts/perf_table.py --update {rel}`")


def test_readme_has_the_compact_table_and_performance_md_the_full_one():
    assert [n for n, _ in perf_table.marked_parts(read("README.md"))] == ["compact"]
    names = [n for n, _ in perf_table.marked_parts(read(os.path.join("docs", "performance.md")))]
    assert "full" in names and "summary" in names


def test_readme_is_a_front_page():
    n = read("README.md").count("\n")
    assert n <= 300, f"README.md has {n} lines; move details into docs/"


@pytest.mark.parametrize("rel", doc_files())
def test_relative_links_exist(rel):
    text = read(rel)
    base = os.path.dirname(os.path.join(ROOT, rel))
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if path and not os.path.exists(os.path.normpath(os.path.join(base, path))):
            missing.append(target)
    assert not missing, f"{rel} links to missing files: {missing}"


def test_every_doc_is_linked_from_the_readme():
    readme = read("README.md")
    for rel in doc_files()[1:]:
        assert f"]({rel})" in readme, f"README.md does not link {rel}"
