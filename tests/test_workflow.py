"""The retrain workflow (.github/workflows/retrain.yml): which subjects a push retrains, read
from a real git history by the script the workflow runs, and the job layout that keeps every
subject's wait inside a hosted runner's 6 hours."""

import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO

WORKFLOW = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text())
SCRIPT = REPO / ".github" / "scripts" / "changed-subjects.sh"
HOSTED_RUNNER_LIMIT_MIN = 360


def git(repo, *args) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin"}  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def commit(repo, files: dict[str, str | None], message: str) -> str:
    for name, text in files.items():
        path = repo / name
        if text is None:
            git(repo, "rm", "-q", name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        git(repo, "add", name)
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").strip()


def changed(repo, *args) -> list[str]:
    result = subprocess.run([str(SCRIPT), *args], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    commit(tmp_path, {"subjects/rex/run.yaml": "a", "subjects/bag/run.yaml": "a", "README": "r"}, "start")
    return tmp_path


def test_a_push_of_several_commits_retrains_every_subject_any_of_them_changed(repo):
    before = git(repo, "rev-parse", "HEAD").strip()
    commit(repo, {"subjects/rex/photos/1.jpg": "x"}, "rex photo")
    commit(repo, {"subjects/cat/run.yaml": "c"}, "new subject")
    commit(repo, {"README": "docs only"}, "docs")
    assert changed(repo, "push", before) == ["cat", "rex"]
    assert changed(repo, "push", "0" * 40) == ["bag", "cat", "rex"]  # a new branch: all of it


def test_removed_and_oddly_named_subjects_are_skipped_and_dispatch_picks_one_or_all(repo):
    before = git(repo, "rev-parse", "HEAD").strip()
    commit(repo, {"subjects/bag/run.yaml": None, 'subjects/a"b/run.yaml': "q"}, "remove bag, odd name")
    assert changed(repo, "push", before) == []
    assert changed(repo, "dispatch", "rex") == ["rex"]
    assert changed(repo, "dispatch", "") == ["rex"]  # bag is gone, a"b is refused


def test_each_subject_waits_in_its_own_job_within_the_hosted_runner_limit():
    assert "concurrency" not in WORKFLOW  # GitHub would cancel a queued push's runs
    plan, retrain = WORKFLOW["jobs"]["plan"], WORKFLOW["jobs"]["retrain"]
    checkout = next(s for s in plan["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    assert (
        retrain["needs"] == "plan"
        and "fromJSON(needs.plan.outputs.subjects)" in retrain["strategy"]["matrix"]["subject"]
    )
    assert retrain["strategy"]["fail-fast"] is False
    wait_s = int(WORKFLOW["env"]["WAIT_SECONDS"])
    assert wait_s / 60 + 10 < retrain["timeout-minutes"] < HOSTED_RUNNER_LIMIT_MIN
    (submit,) = [s["run"] for s in retrain["steps"] if "proxytune submit" in s.get("run", "")]
    assert re.search(r'--wait --timeout "\$WAIT_SECONDS"', submit)
    assert '--image "$PROXYTUNE_IMAGE"' in submit and 'if [ -z "$PROXYTUNE_IMAGE" ]' in submit
    (install,) = [s["run"] for s in retrain["steps"] if "make install" in s.get("run", "")]
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in install
