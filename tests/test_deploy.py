"""deploy/ works as shipped: every manifest is one the Kubernetes versions we
claim accept, and the image gets every file the command imports.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
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
            pytest.fail(f"{manifest.name} is not valid for Kubernetes {version}: {where}: {e.message}")


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
    assert re.search(rf"schemas of Kubernetes {re.escape(K8S_OLDEST)} and\s+{re.escape(K8S_NEWEST)}\b",
                     text), "deploy/README.md must say which versions tests/test_deploy.py checks"
    job_text = (DEPLOY / "migrate-job.yaml").read_text(encoding="utf-8")
    assert f"Needs Kubernetes >= {K8S_OLDEST}" in job_text
    shipped = Version(kubernetes_validate.latest_version())
    assert Version(K8S_NEWEST) <= shipped
