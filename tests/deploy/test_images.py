"""Static checks of the training images (images/Dockerfile, images/Dockerfile.cpu) and
the build context (.dockerignore) against pyproject.toml and settings.py.

No Docker engine is needed: the Dockerfiles are parsed here (line continuations
joined, one instruction per line) and the checks read the real content, so a
changed pin, a root USER or a secret in an ENV fails the test suite before an image
is ever built.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.requirements import Requirement

from rlhf.adapters.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "images" / "Dockerfile"
CPU = ROOT / "images" / "Dockerfile.cpu"
DOCKERFILES = {"gpu": GPU, "cpu": CPU}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------ a tiny parser
@dataclass
class Instruction:
    line: int  # first line of the instruction in the file
    op: str  # upper-case keyword: FROM, ARG, RUN, ...
    args: str  # the rest, continuations joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and blank lines dropped, lines ending
    in a backslash joined with the next (comment lines inside a continuation are
    skipped, as Docker does)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        op, _, args = joined.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
    if buf:
        raise ValueError(f"line {start}: a continuation runs past the end of the file")
    return out


def key_values(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` / `LABEL ...` / `ARG A=1` -> {A: "1", B: "x y"}; a bare `ARG A` -> {A: ""}."""
    result = {}
    for token in shlex.split(args):
        name, _, value = token.partition("=")
        result[name] = value
    return result


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (index 0: global ARGs before the first FROM)."""
    groups: list[list[Instruction]] = [[]]
    for ins in instructions:
        if ins.op == "FROM":
            groups.append([])
        groups[-1].append(ins)
    return groups


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Every ARG default in the file (global and per stage; the last one wins)."""
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.op == "ARG":
            defaults.update(key_values(ins.args))
    return defaults


def copy_sources(ins: Instruction) -> list[str]:
    """Sources of a COPY/ADD from the build context; [] for `COPY --from=...`."""
    if ins.args.startswith("["):
        import json

        words = json.loads(ins.args)
    else:
        words = shlex.split(ins.args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param].read_text())


def _install_calls(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every `install.sh` call in RUN instructions."""
    calls = []
    for ins in instructions:
        if ins.op == "RUN" and "install.sh" in ins.args:
            words = shlex.split(ins.args)
            at = next(i for i, w in enumerate(words) if w.endswith("install.sh"))
            calls.append(words[at + 1:])
    return calls


# ------------------------------------------------------------------ the parser itself
def test_parser_joins_continuations_and_skips_comments():
    text = 'FROM a AS b\n# note\nENV X=1 \\\n    # inside\n    Y="two words"\nRUN echo hi \\\n && echo there\n'
    ins = parse_dockerfile(text)
    assert [(i.op, i.line) for i in ins] == [("FROM", 1), ("ENV", 3), ("RUN", 6)]
    assert key_values(ins[1].args) == {"X": "1", "Y": "two words"}
    assert ins[2].args == "echo hi && echo there"
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("RUN a \\\n")


# ------------------------------------------------------------------ versions vs pyproject
def _torch_requirement() -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r for r in reqs if r.name == "torch")


def test_torch_pin_is_admitted_by_pyproject_and_is_its_upper_pin(image):
    name, instructions = image
    pin = arg_defaults(instructions)["TORCH_VERSION"]
    spec = _torch_requirement().specifier
    assert spec.contains(pin), f"{name}: TORCH_VERSION={pin} is outside pyproject's torch{spec}"
    upper = [s.version for s in spec if s.operator in ("<=", "==")]
    assert upper == [pin], f"{name}: TORCH_VERSION={pin}, pyproject's upper pin is {upper}"
    # the CUDA/CPU local build of that version must still satisfy pyproject (no reinstall)
    local = "cu128" if name == "gpu" else "cpu"
    assert spec.contains(f"{pin}+{local}")


def test_torch_comes_from_the_right_index(image):
    name, instructions = image
    url = arg_defaults(instructions)["TORCH_INDEX_URL"]
    expected = {"gpu": "https://download.pytorch.org/whl/cu128", "cpu": "https://download.pytorch.org/whl/cpu"}
    assert url == expected[name]


def test_python_version_matches_requires_python(image):
    name, instructions = image
    version = arg_defaults(instructions)["PYTHON_VERSION"]
    assert re.fullmatch(r"3\.\d+", version), f"{name}: PYTHON_VERSION={version!r}"
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert requires.contains(f"{version}.0"), f"{name}: Python {version} vs requires-python {requires}"


def test_cpu_base_is_python_slim_and_gpu_base_is_cuda_cudnn_runtime():
    gpu = parse_dockerfile(GPU.read_text())
    defaults = arg_defaults(gpu)
    cuda_image = defaults["CUDA_IMAGE"].replace("${CUDA_VERSION}", defaults["CUDA_VERSION"])
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", cuda_image), cuda_image
    assert "cu128" in defaults["TORCH_INDEX_URL"] and defaults["CUDA_VERSION"].startswith("12.8")
    gpu_bases = [i.args.split()[0] for i in gpu if i.op == "FROM"]
    assert gpu_bases[-1] == "${CUDA_IMAGE}"

    cpu = parse_dockerfile(CPU.read_text())
    cpu_bases = [i.args.split()[0] for i in cpu if i.op == "FROM"]
    assert cpu_bases[-1] == "python:${PYTHON_VERSION}-slim"


def test_package_installed_with_the_right_extras(image):
    name, instructions = image
    calls = _install_calls(instructions)
    assert len(calls) == 1, f"{name}: expected one install.sh call, found {calls}"
    python, index, torch_version, *extras = calls[0]
    assert index == "${TORCH_INDEX_URL}" and torch_version == "${TORCH_VERSION}"
    optional = PYPROJECT["project"]["optional-dependencies"]
    # every image serves MLflow for the helm chart, basic auth included (mlflow[auth])
    assert any(Requirement(r).name == "mlflow" and "auth" in Requirement(r).extras for r in optional["server"])
    # every image can launch multi-node stages: the kubeflow SDK submits Trainer jobs
    assert any(Requirement(r).name == "kubeflow" for r in optional["cluster"])
    if name == "gpu":
        assert extras == ["gpu,server,cluster"]
        assert any(Requirement(r).name == "deepspeed" for r in optional["gpu"])
    else:
        assert extras == ["server,cluster"], f"cpu image must not install deepspeed, got {extras}"
    # kfp is a core dependency: the components run with install_kfp_package=False
    assert any(Requirement(r).name == "kfp" for r in PYPROJECT["project"]["dependencies"])


def test_install_script_installs_torch_pinned_then_the_package():
    script = (ROOT / "images" / "install.sh").read_text()
    subprocess.run(["sh", "-n", str(ROOT / "images" / "install.sh")], check=True)
    torch_line = script.index('--index-url "$torch_index_url" "torch==${torch_version}"')
    package_line = script.index('pip install "$spec"')
    assert torch_line < package_line
    assert 'spec="/src[${extras}]"' in script and "PIP_CONSTRAINT=" in script
    assert "import kfp" in script and "rlhf --help" in script


# ------------------------------------------------------------------ build context
def test_every_copy_source_exists(image):
    name, instructions = image
    sources = [src for ins in instructions if ins.op in ("COPY", "ADD") for src in copy_sources(ins)]
    assert sources, f"{name}: no COPY from the build context"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"{name}: COPY sources missing from the repository: {missing}"
    copied_dirs = {s.rstrip("/") for s in sources}
    assert {"pyproject.toml", "README.md", "src", "components", "pipelines"} <= copied_dirs
    assert not copied_dirs & {".", "tests", ".venv", "runs"}, f"{name}: copies too much: {copied_dirs}"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, near enough: a pattern is a path glob from the context root
    (`**` any depth); a match on a folder excludes what is under it; `!` re-includes."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_ignore_matcher_follows_docker_rules():
    pats = [".venv", "**/__pycache__", "**/*.pem", "runs", "!keep.pem"]
    assert _ignored(".venv/bin/python", pats)
    assert _ignored("src/rlhf/__pycache__/x.pyc", pats)
    assert _ignored("deep/a/b.pem", pats) and not _ignored("keep.pem", pats)
    assert not _ignored("src/runs/x.py", pats)  # root-anchored
    assert not _ignored("src/rlhf/models/tokenizer.py", pats)


def test_dockerignore_excludes_local_state_and_secrets():
    patterns = _dockerignore_patterns()
    for path in [".venv/bin/python", ".git/HEAD", "runs/mlflow.db", "runs/demo-1/summary.json",
                 "src/rlhf/__pycache__/cli.cpython-311.pyc", "rlhf_pipeline.egg-info/PKG-INFO",
                 "src/rlhf_pipeline.egg-info/PKG-INFO", ".pytest_cache/v", ".env", "deploy/.env",
                 "certs/tls.key", "server.pem"]:
        assert _ignored(path, patterns), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_everything_the_images_copy():
    patterns = _dockerignore_patterns()
    sources = {src for path in DOCKERFILES.values() for ins in parse_dockerfile(path.read_text())
               if ins.op in ("COPY", "ADD") for src in copy_sources(ins)}
    # the source files git knows (tracked or new, not git-ignored build outputs)
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *sorted(sources)],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert any(f.startswith("src/rlhf/") for f in listed), "git listed no sources under src/rlhf"
    dropped = [f for f in listed if _ignored(f, patterns)]
    assert not dropped, f".dockerignore removes files the images need: {dropped[:10]}"


# ------------------------------------------------------------------ runtime stage
def test_final_stage_runs_as_numeric_non_root_user(image):
    name, instructions = image
    final = stages(instructions)[-1]
    users = [ins.args for ins in final if ins.op == "USER"]
    assert users, f"{name}: the final stage never sets USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"{name}: USER {user!r} must be numeric (runAsNonRoot checks the UID)"
    assert int(user) != 0, f"{name}: USER is root"
    assert any(ins.op == "RUN" and f"--uid \"${{UID}}\"" in ins.args for ins in final)
    assert arg_defaults(final)["UID"] == user, f"{name}: the created user's UID differs from USER {user}"


def test_final_stage_environment(image):
    name, instructions = image
    final = stages(instructions)[-1]
    env: dict[str, str] = {}
    for ins in final:
        if ins.op == "ENV":
            env.update(key_values(ins.args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PIP_NO_CACHE_DIR"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:"), "KFP runs `python3 -m kfp...`: the venv must come first"
    for var in ("HOME", "HF_HOME", "RLHF_HOME"):
        assert env[var].startswith(env["HOME"]), f"{name}: {var}={env[var]} is outside the user's HOME"
    # the folders are created and handed to the user in the same stage
    setup = " ".join(ins.args for ins in final if ins.op == "RUN")
    for folder in ("/home/rlhf/.cache/huggingface", "/home/rlhf/runs"):
        assert folder in setup
    assert env["HOME"] == "/home/rlhf" and "chown -R" in setup
    # the venv (and the GPU image's standalone Python) come from the builder
    copies = [ins.args for ins in final if ins.op == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_git_sha_and_oci_labels_come_from_build_args(image):
    name, instructions = image
    final = stages(instructions)[-1]
    assert "GIT_SHA" in arg_defaults(final), f"{name}: no ARG GIT_SHA in the final stage"
    env = {}
    labels = {}
    for ins in final:
        if ins.op == "ENV":
            env.update(key_values(ins.args))
        if ins.op == "LABEL":
            labels.update(key_values(ins.args))
    assert env.get("RLHF_GIT_SHA") == "${GIT_SHA}"
    assert labels["org.opencontainers.image.revision"] == "${GIT_SHA}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"].startswith("${")
    assert arg_defaults(final)["VERSION"] == PYPROJECT["project"]["version"]
    # settings.py is what reads it
    assert Settings.from_env({"RLHF_GIT_SHA": "abc123"}).git_sha == "abc123"


def test_entrypoint_prints_cli_help(image):
    name, instructions = image
    final = stages(instructions)[-1]
    entry = [ins.args for ins in final if ins.op == "ENTRYPOINT"]
    cmd = [ins.args for ins in final if ins.op == "CMD"]
    assert entry == ['["rlhf"]'] and cmd == ['["--help"]'], f"{name}: {entry} {cmd}"
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["rlhf"] == "rlhf.cli:main"


SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|API_?KEY|PRIVATE_KEY|^AWS_ACCESS_KEY_ID$", re.I)
SECRET_VALUE = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face tokens
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),  # AWS secret key shape
]


def test_no_secrets_in_env_arg_or_literals(image):
    name, instructions = image
    for ins in instructions:
        if ins.op in ("ENV", "ARG"):
            for var in key_values(ins.args):
                assert not SECRET_NAME.search(var), f"{name}:{ins.line}: {ins.op} {var} looks like a secret"
                assert not var.startswith("AWS_"), f"{name}:{ins.line}: credentials come from Kubernetes Secrets"
    text = DOCKERFILES[name].read_text() + (ROOT / "images" / "install.sh").read_text()
    for rx in SECRET_VALUE:
        assert not rx.search(text), f"{name}: a literal looks like a key: {rx.search(text).group(0)[:8]}..."


def test_secret_checks_can_fail():
    bad = parse_dockerfile("FROM x\nENV HF_TOKEN=1 AWS_ACCESS_KEY_ID=2\nARG DB_PASSWORD\n")
    names = [v for ins in bad if ins.op in ("ENV", "ARG") for v in key_values(ins.args)]
    assert all(SECRET_NAME.search(v) for v in names)
    assert SECRET_VALUE[0].search("ENV K=AKIAIOSFODNN7EXAMPLE")
    assert SECRET_VALUE[-1].search("K=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


# ------------------------------------------------------------------ image name
def test_default_image_tag_is_the_documented_name_with_the_project_version():
    version = PYPROJECT["project"]["version"]
    expected = f"ghcr.io/rlhf-pipeline/rlhf:{version}"
    assert Settings.image == expected
    assert Settings.from_env({}).image == expected
    assert Settings.from_env({"RLHF_IMAGE": "registry.local/rlhf:dev"}).image == "registry.local/rlhf:dev"
    readme = (ROOT / "images" / "README.md").read_text()
    assert expected in readme and "RLHF_IMAGE" in readme
    for path in DOCKERFILES.values():
        assert f"ghcr.io/rlhf-pipeline/rlhf:{version}" in path.read_text()
