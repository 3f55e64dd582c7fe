"""The README and docs/ stay true: commands, flag reference, metric names, links, the site build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import unicodedata
from pathlib import Path

import pytest

from aggregator.cli import build_parser as aggregator_parser
from fleet_demo.__main__ import parser as demo_parser
from fleet_demo.nats_server import NatsServer
from mock_worker.__main__ import parser as mock_worker_parser

from ..support import mock_worker, scrape, wait_until

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINKED = [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *PAGES]
DEMO_COMMAND = "python3 -m pip install -e '.[demo]' && llm-fleet-demo"
TEST_COMMAND = "python3 -m pip install -e '.[test]' && python3 -m pytest"


def generator():
    spec = importlib.util.spec_from_file_location("generate_configuration", DOCS / "generate_configuration.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The README's commands ------------------------------------------------------------------


def test_the_readme_commands_exist():
    text = README.read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert DEMO_COMMAND in text
    assert "llm-fleet-demo" in scripts and "llm-aggregator" in scripts and "llm-mock-worker" in scripts
    assert TEST_COMMAND in text


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"^python3 -m pip install .*-e '\.\[([a-z,]+)\]'\s*$", ci, flags=re.MULTILINE)
    assert installs, "no `python3 -m pip install ... -e '.[...]'` in .ci/run"
    assert any("test" in extras.split(",") for extras in installs)
    # The suite itself, exactly as the README runs it (lint steps may come before or after); .ci/run
    # runs each step through its `step` function, which records the first failure.
    commands = [line.split("#", 1)[0].strip().removeprefix("step ").strip() for line in ci.splitlines()]
    assert TEST_COMMAND.rpartition(" && ")[2] in commands


def test_the_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines; move reference material into docs/"


def test_the_readme_links_every_docs_page():
    links = {target.partition("#")[0] for target in links_in(README)}
    missing = [f"docs/{page.name}" for page in PAGES if f"docs/{page.name}" not in links]
    assert missing == []


# The flag reference ----------------------------------------------------------------------


def test_the_configuration_reference_is_generated_from_the_parsers():
    committed = (DOCS / "configuration.md").read_text()
    assert generator().render(committed) == committed, "docs/configuration.md is stale: run python3 docs/generate_configuration.py"


def options(parser) -> list[str]:
    return [action.option_strings[-1] for action in parser._actions
            if action.option_strings and action.option_strings[-1] != "--help"]


@pytest.mark.parametrize("parser", [aggregator_parser, mock_worker_parser, demo_parser],
                         ids=["aggregator", "mock_worker", "fleet_demo"])
def test_every_flag_is_in_the_configuration_tables(parser):
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", (DOCS / "configuration.md").read_text(), flags=re.MULTILINE))
    missing = [flag for flag in options(parser()) if flag not in documented]
    assert missing == []


def test_the_generated_tables_name_each_flags_environment_variable():
    gen = generator()
    table = gen.table(aggregator_parser)
    assert "| `--nats-url` | `NATS_SERVER` | `nats://localhost:4222` |" in table
    assert "| `--scrape` | `AGGREGATOR_SCRAPE` |  |" in table


def test_the_generated_defaults_do_not_depend_on_the_environment(monkeypatch):
    gen = generator()
    before = gen.table(aggregator_parser)
    monkeypatch.setenv("NATS_SERVER", "nats://elsewhere:4222")
    monkeypatch.setenv("AGGREGATOR_PORT", "9999")
    assert gen.table(aggregator_parser) == before
    assert os.environ["AGGREGATOR_PORT"] == "9999"  # put back as it was


# Links -------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", flags=re.DOTALL)
_LINK = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links_in(path: Path) -> list[str]:
    return [target for target in _LINK.findall(prose(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto:


def headings(path: Path) -> list[str]:
    return [re.sub(r"^#+\s*", "", line).strip() for line in prose_lines(path) if re.match(r"^#{1,6}\s", line)]


def prose_lines(path: Path) -> list[str]:
    return _FENCE.sub("", path.read_text()).splitlines()


def github_anchor(heading: str) -> str:
    text = heading.replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def mkdocs_anchor(heading: str) -> str:
    # Python-Markdown's toc.slugify, which mkdocs uses.
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """Anchors that GitHub and the mkdocs site both give a heading (they differ on some)."""
    return {github_anchor(h) for h in headings(path)} & {mkdocs_anchor(h) for h in headings(path)}


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links_in(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert broken == []


def test_the_link_checker_sees_links_and_anchors():
    page = DOCS / "benchmarks.md"
    assert "../bench/RESULTS.md" in links_in(page)
    assert "latest-results" in anchors(page)
    assert github_anchor("Fixed compared to Dynamo's aggregator") == "fixed-compared-to-dynamos-aggregator"
    # The two disagree on runs of spaces and hyphens: such a heading can be linked to by neither.
    assert mkdocs_anchor("Restarts (`--x`)") == "restarts-x" != github_anchor("Restarts (`--x`)")


# The metrics reference ------------------------------------------------------------------


def documented(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}(_total)?\b", text) is not None


@pytest.fixture
def jetstream_server():
    """A real nats-server with JetStream, stopped after the processes that use it."""
    with NatsServer(jetstream=True) as server:
        yield server


def test_every_family_the_aggregator_exports_is_in_the_metrics_reference(jetstream_server, processes):
    """A real aggregator with every source on (legacy push, pull, journal, GPUs, snapshots, the 1.x event
    plane): each family it exports is documented in docs/metrics.md, and each re-exported worker family in
    component-metrics.md."""
    url = jetstream_server.url
    aggregator = processes.aggregator(url, "--scrape", "backend/generate", "--hit-rate-stream", "DOCS_HITS",
                                      "--stale-after", "30")
    processes.add(mock_worker(url, "--protocol", "legacy", "--workers", "2", "--interval", "0.2", "--gpu",
                              "simulated", "--metrics-interval", "0.2", "--gpu-interval", "0.2", "--seed", "1",
                              "--component", "pushed"))
    processes.add(mock_worker(url, "--workers", "1", "--interval", "0.2", "--gpu", "none", "--seed", "3",
                              "--component", "eventplane"))  # the default protocol: Dynamo 1.x
    processes.add(mock_worker(url, "--workers", "1", "--interval", "0.2", "--protocol", "legacy", "--mode", "pull",
                              "--gpu", "none", "--no-component-metrics", "--seed", "2"))
    wanted = {"llm_kv_blocks_active", "llm_workers", "llm_kv_hit_rate_percent", "DCGM_FI_DEV_GPU_UTIL",
              "llm_gpus", "llm_gpu_sampler_up", "dynamo_component_requests",
              "llm_aggregator_stats_scrapes", "llm_aggregator_hit_rate_journal_applied",
              "llm_kv_active_decode_blocks", "llm_prefill_tokens_computed", "llm_kv_cached_blocks"}

    def families() -> dict:
        found = scrape(aggregator.url)
        return found if wanted <= set(found) else {}

    exported = wait_until(families, 30, what=f"families {sorted(wanted)}")
    reference = (DOCS / "metrics.md").read_text()
    components = (DOCS / "component-metrics.md").read_text()
    missing = [name for name in exported if not name.startswith(("process_", "python_", "dynamo_component_"))
               and not documented(name, reference)]
    missing += [name for name in exported if name.startswith("dynamo_component_") and not documented(name, components)]
    assert missing == []


# The site ------------------------------------------------------------------------------------


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [page.name for page in PAGES if f": {page.name}" not in nav] == []


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (python3 -m pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()
