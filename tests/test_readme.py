"""The README and deploy/ say only true things: the Usage block is the real
--help, every make target, script, file and flag they show exists, and the
Kubernetes Job agrees with itself and with .env.example.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEPLOY = ROOT / "deploy"
DOCS = [README, DEPLOY / "README.md"]


def load_updater():
    spec = importlib.util.spec_from_file_location(
        "update_readme_usage", ROOT / "scripts" / "update_readme_usage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(path: Path, langs=("sh", "bash", "")) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)
            if lang in langs]


def commands(path: Path) -> list[list[str]]:
    """Shell command lines of the code blocks, split into words."""
    out = []
    for block in code_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def help_flags(script: str) -> set[str]:
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                         text=True, check=True, env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", out.stdout))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


# ---------------------------------------------------------------- README


def test_usage_block_is_the_real_help():
    updater = load_updater()
    block = updater.usage_block(README.read_text(encoding="utf-8"))
    assert block == updater.help_text(), \
        "README.md Usage block is stale: run python3 scripts/update_readme_usage.py"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_make_targets_shown_exist(doc):
    targets = make_targets()
    shown = [c[1] for c in commands(doc) if c[:1] == ["make"] and len(c) > 1]
    shown += [c[c.index("make") + 1] for c in commands(doc)
              if "make" in c[1:] and c.index("make") + 1 < len(c)]  # VAR=x make test
    for target in shown:
        assert target in targets, f"{doc.name} shows `make {target}`: no such Makefile target"
    if doc == README:
        assert {"demo", "test"} <= set(shown)


def python_commands(doc: Path) -> list[list[str]]:
    """The words from the script on, of every `python3 SCRIPT ...` command line."""
    out = []
    for words in commands(doc):
        for i, w in enumerate(words):
            if w in ("python3", "exec") and i + 1 < len(words) and words[i + 1].endswith(".py"):
                out.append(words[i + 1:])
                break
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_and_flags_shown_exist(doc):
    flags = {"move.py": help_flags("move.py"), "seed/seeder.py": help_flags("seed/seeder.py")}
    shown = python_commands(doc)
    assert shown
    for script, *args in shown:
        assert (ROOT / script).is_file(), f"{doc.name} runs {script}: no such file"
        if script in flags:
            for arg in args:
                if arg.startswith("-"):
                    flag = arg.split("=")[0]
                    assert flag in flags[script], f"{doc.name}: {script} has no {flag}"


def test_every_flag_named_in_readme_exists():
    """Also the ones in the prose: `--shard I/N`, `--create-index`, ..."""
    known = help_flags("move.py") | help_flags("seed/seeder.py") | help_flags("bench/run.py")
    text = README.read_text(encoding="utf-8")
    usage = load_updater().usage_block(text)
    text = text.replace(usage, "")
    named = set(re.findall(r"`[^`]*?(?<![\w-])(--[a-z][\w-]*)", text))
    assert named
    assert named <= known, f"README names flags move.py does not have: {named - known}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_named_exist(doc):
    text = doc.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w./-])((?:deploy|scripts|seed|tests)/[\w./-]*\w)", text))
    paths |= {m for m in re.findall(r"`([\w./-]+\.(?:py|yaml|sql|example|txt))`", text)}
    assert paths
    for p in paths:  # relative to the repository root, or to deploy/ in deploy/README.md
        assert (ROOT / p).exists() or (DEPLOY / p).exists(), f"{doc.name} names {p}: no such file"


def test_benchmarks_live_in_docs_not_in_the_readme():
    """make bench rewrites docs/benchmarks.md, one marked section per network model; the
    README only links it, so a bench run never touches the README."""
    bench = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    sys.path.insert(0, str(ROOT))
    from bench.report import markers
    for model in ("loopback", "latency", "ratelimit"):
        start, end = markers(model)
        assert bench.count(start) == 1 and bench.count(end) == 1, model
        assert bench.index(start) < bench.index(end)
    text = README.read_text(encoding="utf-8")
    assert "<!-- bench:" not in text
    assert "(docs/benchmarks.md)" in text


def test_readme_is_for_users():
    """Short, and about the tool as it is: no dates, no history of its development."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 350
    prose = text.replace(load_updater().usage_block(text), "")
    prose = re.sub(r"^```json\n.*?^```$", "", prose, flags=re.S | re.M)  # IAM's "Version"
    for pattern in (r"\b20\d\d-\d\d-\d\d\b", r"\bsession\b", r"\bused to\b", r"\bFixed on\b",
                    r"\bMeasured and left\b", r"\bissue \d+"):
        assert not re.search(pattern, prose, re.I), pattern
    for doc in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|json))\)", text):
        assert (ROOT / doc).is_file(), f"README links {doc}: no such file"


def test_readme_exit_codes_match_move():
    sys.path.insert(0, str(ROOT))
    from avatarmove import settings
    text = README.read_text(encoding="utf-8")
    for code in (settings.EXIT_OK, settings.EXIT_FAILED, settings.EXIT_USAGE,
                 settings.EXIT_INTERRUPTED):
        assert re.search(rf"^\s*\| {code} \|", text, re.M), f"exit code {code} is not documented"


# ---------------------------------------------------------------- deploy/


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def test_indexed_job_runs_one_shard_per_index():
    job = load_yaml("migrate-job.yaml")
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    assert spec["backoffLimitPerIndex"] >= 1
    (container,) = pod["containers"]
    line = " ".join(container.get("command", []) + container.get("args", []))
    m = re.search(r'--shard\s+"?\$\{?JOB_COMPLETION_INDEX\}?/(\d+)"?', line)
    assert m, f"the command does not shard by JOB_COMPLETION_INDEX: {line}"
    n = int(m.group(1))
    assert spec["completions"] == n, "completions must equal N in --shard I/N"
    assert spec["parallelism"] <= n
    # $VAR is expanded by a shell; Kubernetes' own $(VAR) only for declared env
    assert container["command"][:2] == ["sh", "-c"] or "$(JOB_COMPLETION_INDEX)" in line
    flags = help_flags("move.py")
    for word in shlex.split(container["args"][0]):
        if word.startswith("--"):
            assert word in flags, f"migrate-job.yaml uses {word}: not a move.py flag"
    rules = spec["podFailurePolicy"]["rules"]
    fail_index = [r for r in rules if r["action"] == "FailIndex"]
    assert fail_index and fail_index[0]["onExitCodes"]["values"] == [2]
    assert fail_index[0]["onExitCodes"]["containerName"] == container["name"]


def env_example_names() -> tuple[set[str], set[str]]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    required = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
    optional = set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    return required, optional


def test_secret_example_holds_the_env_example_settings():
    secret = load_yaml("secret.example.yaml")
    assert secret["kind"] == "Secret"
    required, optional = env_example_names()
    keys = set(secret["stringData"])
    assert required <= keys, f"secret.example.yaml lacks {required - keys}"
    assert keys <= required | optional
    text = (DEPLOY / "secret.example.yaml").read_text(encoding="utf-8")
    # a profile needs a config file: use keys or a role
    for name in optional - keys - {"AWS_PROFILE"}:
        assert f"# {name}:" in text, f"secret.example.yaml does not mention {name}"
    for name in ("migrate-job.yaml", "verify-job.yaml"):
        pod = load_yaml(name)["spec"]["template"]["spec"]
        refs = [e["secretRef"]["name"] for c in pod["containers"] for e in c["envFrom"]]
        assert refs == [secret["metadata"]["name"]], f"{name} must take its env from the Secret"


def test_verify_job_runs_verify():
    job = load_yaml("verify-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python3", "move.py", "--verify"]


def test_dockerfile_installs_requirements_move_and_its_package():
    """What deploy/README.md says the image holds (tests/test_deploy.py checks
    that every file the command imports gets into it)."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "pip install -r requirements.txt" in text
    assert re.search(r"^COPY move\.py ", text, re.M)
    assert re.search(r"^COPY avatarmove/ avatarmove/$", text, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!move.py" in ignore and "!avatarmove/" in ignore


def test_prepare_sql_matches_the_journal_move_creates(dsn):
    """deploy/prepare.sql makes the same journal move.py would, so runs accept it."""
    import psycopg2
    sys.path.insert(0, str(ROOT))
    from avatarmove.database import Database
    from avatarmove.journal import JOURNAL_COLUMNS, ensure_journal
    from avatarmove.settings import Settings
    sql_text = (DEPLOY / "prepare.sql").read_text(encoding="utf-8")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
        cur.execute(sql_text)
        cur.execute("SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'avatars_move_journal'")
        assert {name for (name,) in cur.fetchall()} == JOURNAL_COLUMNS
        cur.execute("INSERT INTO avatars (path) VALUES ('image/a.png')")
    cfg = Settings(db=dsn, source_bucket="legacy-s3", dest_bucket="production-s3",
                   source_prefix="image/", dest_prefix="avatar/", table="avatars",
                   column="path")
    db = Database(cfg, "readme-test")
    ensure_journal(db)
    assert db.rewrite([("image/a.png", "avatar/a.png")]) == {"image/a.png": 1}
    db.close()
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, old_path, new_path, rows FROM avatars_move_journal")
        assert cur.fetchall() == [("readme-test", "image/a.png", "avatar/a.png", 1)]
    conn.close()
