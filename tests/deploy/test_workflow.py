"""The GitHub Actions workflow we ship to users: tests, compiled specs, images on tags."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def workflow() -> dict:
    return yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"Run the tests:\n\n    (.+)\n", text).group(1).strip()


def test_test_job_runs_the_readme_test_command():
    steps = workflow()["jobs"]["test"]["steps"]
    runs = [s.get("run", "").strip() for s in steps]
    assert readme_test_command() in runs


def test_compile_job_uploads_every_spec():
    job = workflow()["jobs"]["compile"]
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert "rlhf compile --output dist/pipeline.yaml" in script and "profiles/*.yaml" in script
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "dist/*.yaml"


def test_images_only_on_tags_for_both_dockerfiles():
    wf = workflow()
    assert "tags" in wf[True]["push"]  # `on:` parses as True in YAML 1.1
    job = wf["jobs"]["images"]
    assert job["if"] == "github.ref_type == 'tag'" and set(job["needs"]) == {"test", "compile"}
    files = {m["dockerfile"] for m in job["strategy"]["matrix"]["include"]}
    assert files == {"images/Dockerfile", "images/Dockerfile.cpu"}
    assert all((ROOT / f).is_file() for f in files)


def test_no_credentials_in_the_workflow():
    text = (ROOT / ".github/workflows/ci.yml").read_text()
    assert "secrets.GITHUB_TOKEN" in text  # the only secret, provided by GitHub
    assert not re.search(r"(AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{20,}|password:\s*[^$\s])", text)
