"""deploy/ works as shipped: every manifest is one the Kubernetes versions we
claim accept, and the image gets every file the command imports.
"""
from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from docker.utils.build import PatternMatcher
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# ------------------------------------------------- manifests vs. Kubernetes

# The oldest version deploy/README.md supports ("Needs Kubernetes 1.29 or
# later") and the newest whose schemas kubernetes-validate (>=1.37.0, see
# requirements-dev.txt) ships; deploy/README.md names both.
K8S_OLDEST = "1.29"
K8S_NEWEST = "1.37"
K8S_VERSIONS = [K8S_OLDEST, K8S_NEWEST]
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def validate(resource: dict, version: str) -> None:
    """Strict validation (unknown fields are errors too) against the bundled
    schemas of `version`. The Python API, not the CLI: the CLI only warns and
    exits 0 when it has no schema for a kind."""
    used = kubernetes_validate.validate(resource, version, strict=True)
    assert used == version, f"validated against {used}, not {version}"


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {"migrate-job.yaml", "verify-job.yaml",
                                           "secret.example.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(manifest, version):
    resources = documents(manifest)
    assert resources, f"{manifest.name} holds no resource"
    for resource in resources:
        try:
            validate(resource, version)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{manifest.name} is not valid for Kubernetes {version}: {where}: "
                        f"{e.message}")


def disruption_condition(job: dict) -> dict:
    (rule,) = [r for r in job["spec"]["podFailurePolicy"]["rules"] if "onPodConditions" in r]
    (condition,) = rule["onPodConditions"]
    assert condition["type"] == "DisruptionTarget"
    return condition


def no_status(job):
    del disruption_condition(job)["status"]


def yaml_boolean_status(job):  # `status: True` unquoted
    disruption_condition(job)["status"] = True


def unknown_field(job):
    job["spec"]["backoffLimitsPerIndex"] = 3


@pytest.mark.parametrize("version, breakage, error", [
    pytest.param(v, b, e, id=f"{b.__name__}-{v}") for v, b, e in [
        # the bug this test was written for: 1.29 to 1.34 require `status`
        (K8S_OLDEST, no_status, "'status' is a required property"),
        ("1.34", no_status, "'status' is a required property"),
        (K8S_OLDEST, yaml_boolean_status, "True is not of type 'string'"),
        (K8S_NEWEST, yaml_boolean_status, "True is not of type 'string'"),
        (K8S_OLDEST, unknown_field, "Additional properties are not allowed"),
    ]])
def test_validator_catches_a_broken_job(version, breakage, error):
    """The check above can fail: the validator rejects the Job as it was before
    `status: "True"` (and other ways to get it wrong)."""
    job = copy.deepcopy(documents(DEPLOY / "migrate-job.yaml")[0])
    validate(copy.deepcopy(job), version)
    breakage(job)
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        validate(job, version)
    assert error in caught.value.message


def test_readme_names_the_versions_checked():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert f"Needs Kubernetes {K8S_OLDEST} or later" in text
    assert re.search(rf"schemas of Kubernetes {re.escape(K8S_OLDEST)} and\s+"
                     rf"{re.escape(K8S_NEWEST)}\b", text), \
        "deploy/README.md must say which versions tests/test_deploy.py checks"
    job_text = (DEPLOY / "migrate-job.yaml").read_text(encoding="utf-8")
    assert f"Needs Kubernetes >= {K8S_OLDEST}" in job_text
    shipped = Version(kubernetes_validate.latest_version())
    assert Version(K8S_NEWEST) <= shipped


# ----------------------------------------------------- the image's contents
#
# Docker cannot run here, so the test builds no image. It reads what the build
# would do instead: a file is in the image when Dockerfile.dockerignore lets
# it into the build context (matched by the docker SDK's own .dockerignore
# matcher) and a COPY puts it at the same relative path under the directory
# the ENTRYPOINT runs from.

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"  # BuildKit: <Dockerfile>.dockerignore


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation
    lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


class Image:
    """Where the build puts each file of the context, from a Dockerfile's
    WORKDIR / COPY / ENTRYPOINT and a .dockerignore."""

    def __init__(self, dockerfile: str, dockerignore: str):
        lines = [line.strip() for line in dockerignore.splitlines()]
        self.ignore = PatternMatcher([p for p in lines if p and not p.startswith("#")])
        self.copies = []  # (sources, destination, destination is a directory)
        workdir, dirs = "/", {"/"}
        for word, args in instructions(dockerfile):
            if word == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, args))
                dirs.add(workdir)
            elif word in ("COPY", "ADD"):
                argv = words(args)
                flags = [a for a in argv if a.startswith("--")]
                assert not [f for f in flags if f.startswith("--from")], \
                    "COPY --from: not from the context"
                *sources, dest = [a for a in argv if not a.startswith("--")]
                assert "$" not in args and "<<" not in args, f"{word} {args}: not understood here"
                target = posixpath.normpath(posixpath.join(workdir, dest))
                is_dir = dest.endswith("/") or target in dirs or len(sources) > 1
                if is_dir:
                    dirs.add(target)
                parts = [[p for p in s.split("/") if p not in ("", ".")] for s in sources]
                self.copies.append((parts, target, is_dir))
            elif word == "ENTRYPOINT":
                self.entrypoint = words(args)
                self.workdir = workdir
        python, script = self.entrypoint[:2]
        assert python.startswith("python") and not script.startswith("/")
        self.script = script

    def sent(self, path: str) -> bool:
        """In the build context: not excluded by the .dockerignore."""
        return not self.ignore.matches(path)

    def destinations(self, path: str) -> set[str]:
        """Where COPY puts the context file `path` (repository-relative)."""
        parts = path.split("/")
        out = set()
        for sources, dest, is_dir in self.copies:
            for source in sources:
                n = len(source)
                if n > len(parts) or not all(fnmatchcase(p, s) for p, s in zip(parts, source)):
                    continue
                rest = parts[n:]  # source is `path` itself, or a directory holding it
                if rest:
                    out.add(posixpath.join(dest, *rest))
                else:
                    out.add(posixpath.join(dest, parts[-1]) if is_dir else dest)
        return out

    def has(self, path: str) -> bool:
        """`path` reaches the image where the command looks for it."""
        return self.sent(path) and posixpath.join(self.workdir, path) in self.destinations(path)


def the_image() -> Image:
    return Image(DOCKERFILE.read_text(encoding="utf-8"), DOCKERIGNORE.read_text(encoding="utf-8"))


# Runs the command as the image does (`python3 move.py`, from the directory
# that holds it) and lists the files of every module it loaded.
PROBE = r"""
import contextlib, io, json, os, runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    import move  # also as a module, the way the rest of the code may reach it
files = set()
for module in list(sys.modules.values()):
    paths = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", None) or [])
    files.update(os.path.realpath(p) for p in paths if p)
print(json.dumps({"prefixes": [os.path.realpath(p) for p in {sys.prefix, sys.base_prefix}],
                  "files": sorted(files)}))
"""


def files_the_command_needs(script: str) -> set[str]:
    """Repository-relative files of the modules `python3 <script> --help`
    loads, and every file of each repository package among them (a module the
    command imports later, inside a function, must be there too)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.splitlines()[-1])
    root = ROOT.resolve()
    needed = {script}
    for name in loaded["files"]:
        path = Path(name)
        if (not path.is_relative_to(root)
                or any(path.is_relative_to(p) for p in loaded["prefixes"])  # the venv
                or "site-packages" in path.parts):
            continue
        if path.is_dir():  # a package: all of it
            needed |= {f.relative_to(root).as_posix() for f in path.rglob("*")
                       if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"}
        else:
            needed.add(path.relative_to(root).as_posix())
    return needed


def test_image_gets_every_file_the_command_imports():
    image = the_image()
    needed = files_the_command_needs(image.script)
    assert image.script in needed and "move.py" in needed
    for path in sorted(needed):
        assert image.sent(path), \
            f"{path}: excluded from the build context by {DOCKERIGNORE.name}"
        assert image.has(path), (
            f"{path}: no COPY puts it at {posixpath.join(image.workdir, path)} "
            f"(it goes to {sorted(image.destinations(path)) or 'nowhere'})")
    assert image.has("requirements.txt")  # RUN pip install -r requirements.txt


def test_image_gets_the_avatarmove_package():
    image = the_image()
    for path in ("avatarmove/__init__.py", "avatarmove/settings.py", "avatarmove/sub/deep.py"):
        assert image.has(path), path
    for path in [p.relative_to(ROOT).as_posix() for p in (ROOT / "avatarmove").rglob("*.py")]:
        assert image.has(path), path


@pytest.mark.parametrize("path", [
    "tests/conftest.py",  # nothing the Dockerfile copies
    ".env",  # real credentials: settings come from the Secret
    "deploy/secret.example.yaml",
    "avatarmove/__pycache__/settings.cpython-311.pyc",  # excluded although avatarmove/ is copied
    "avatarmove/settings.pyc",
    "README.md",
])
def test_image_does_not_get(path):
    assert not the_image().has(path)


@pytest.mark.parametrize("dockerfile_edit, dockerignore_edit", [
    pytest.param(("COPY avatarmove/ avatarmove/\n", ""), None, id="no-COPY"),
    pytest.param(("COPY avatarmove/ avatarmove/\n", "COPY avatarmove/ .\n"), None,
                 id="COPY-flattened"),
    pytest.param(None, ("!avatarmove/\n", ""), id="not-in-dockerignore"),
    pytest.param(None, ("!avatarmove/\n", "!avatarmove/\navatarmove/*.py\n"),
                 id="re-excluded-later"),
])
def test_a_broken_dockerfile_or_dockerignore_loses_the_package(dockerfile_edit, dockerignore_edit):
    """The checks above can fail: each edit keeps avatarmove/ out of the image."""
    texts = {"dockerfile": DOCKERFILE.read_text(encoding="utf-8"),
             "dockerignore": DOCKERIGNORE.read_text(encoding="utf-8")}
    for name, edit in (("dockerfile", dockerfile_edit), ("dockerignore", dockerignore_edit)):
        if edit:
            assert edit[0] in texts[name]
            texts[name] = texts[name].replace(*edit)
    image = Image(texts["dockerfile"], texts["dockerignore"])
    assert image.has("move.py")
    assert not image.has("avatarmove/settings.py")
