"""The cluster launcher YAML and the KubeRay RayJob: they parse, and the commands they run exist and load."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "configs" / "cluster" / "cluster.yaml"
RAYJOB = REPO / "configs" / "cluster" / "rayjob.yaml"
DOCS = REPO / "docs" / "cluster.md"
# options of jobs/*.py that take a value
JOB_OPTIONS = {"--operators", "--baseline-config", "--checkpoint", "--from", "--tracking-uri", "--experiment",
               "--parent", "--filter", "--out"}


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _job_commands(text: str) -> list[list[str]]:
    """Every `python jobs/X.py ...` command in `text`, as argv after `python` (shell-joined lines)."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"python (jobs/\S+\.py.*)", line):
            argv = shlex.split(m.group(1).split("`")[0].split(" # ")[0])
            out.append(argv)
    return out


def _check_command(argv: list[str]) -> None:
    from lfb_ray.config import load_config

    script, rest = argv[0], argv[1:]
    assert (REPO / script).is_file(), f"{script} does not exist"
    config, overrides, i = None, [], 0
    while i < len(rest):
        if rest[i] == "--config":
            config, i = rest[i + 1], i + 2
        elif rest[i] in JOB_OPTIONS:
            value = rest[i + 1] if i + 1 < len(rest) else ""
            if value.endswith(".yaml"):
                assert (REPO / value).is_file(), f"{value} does not exist"
            if rest[i] == "--operators":
                assert set(value.split(",")) <= {"none", "nl", "avg", "max"}, value
            i += 2
        elif rest[i].startswith("--"):
            i += 1
        else:
            overrides.append(rest[i])
            i += 1
    if config is not None:
        assert (REPO / config).is_file(), f"{config} does not exist"
        load_config(REPO / config, overrides)


def test_cluster_launcher_yaml():
    c = yaml.safe_load(CLUSTER.read_text())
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_groups and all(g["min_workers"] == 0 and g["max_workers"] >= 1 for g in gpu_groups)
    assert c["docker"]["image"] == _image_of_rayjob()  # lfb_ray's image (docker/Dockerfile), as on KubeRay
    head_cmds = " ".join(c["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmds and "--dashboard-host=127.0.0.1" in head_cmds
    assert "--num-cpus=0" in head_cmds
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in c["worker_start_ray_commands"] if "ray start" in cmd)
    # Nothing installed at boot: the image holds the pinned dependencies.
    assert not any("pip" in cmd for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                                            "initialization_commands") for cmd in c.get(key, []))
    # max_gpus of the AVA configs = what the GPU node types can scale to.
    from lfb_ray.config import load_config

    max_gpus = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_groups)
    for name in ("lfb_nl", "lfb_avg", "lfb_max", "baseline"):
        assert load_config(REPO / "configs" / f"{name}.yaml").cluster.max_gpus == max_gpus, name
    for cmd in _job_commands("\n".join(_strings(c))):
        _check_command(cmd)


def test_rayjob_yaml():
    j = yaml.safe_load(RAYJOB.read_text())
    assert j["apiVersion"] == "ray.io/v1" and j["kind"] == "RayJob"
    spec = j["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert not {"pip", "conda", "uv"} & set(runtime_env)  # the image has the pinned dependencies
    cmds = _job_commands(spec["entrypoint"])
    assert len(cmds) == 1 and cmds[0][:5] == ["jobs/train.py", "--config", "configs/lfb_nl.yaml",
                                              "--operators", "nl,avg,max"]
    assert any(a.startswith("workdir=s3://") for a in cmds[0])  # one storage root: outputs derive from it
    _check_command(cmds[0])
    _assert_no_relative_paths(cmds[0])

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for c in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {})
    gpu = [g for g in cluster["workerGroupSpecs"]
           if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu)
    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert images == {_image_of_rayjob()}
    from lfb_ray.config import load_config

    max_gpus = sum(int(c["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
                   for g in gpu for c in g["template"]["spec"]["containers"])
    assert load_config(REPO / "configs" / "lfb_nl.yaml").cluster.max_gpus == max_gpus


def _image_of_rayjob() -> str:
    j = yaml.safe_load(RAYJOB.read_text())
    (image,) = {c["image"] for c in j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    return image


DOCKERFILE = REPO / "docker" / "Dockerfile"
CONSTRAINTS = REPO / "requirements" / "cluster-constraints.txt"


def test_cluster_image_is_ray_of_the_pinned_version_plus_the_constraints():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M).group(1)
    pins = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#"))
    # The base is the rayproject/ray image of the pinned Ray, Python 3.11, a CUDA variant.
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pins['ray'])}-py311-(gpu|cu\d+)", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert "pip install --no-cache-dir -r requirements/cluster-constraints.txt" in text
    assert "--no-deps -c requirements/cluster-constraints.txt ." in text
    # The image the cluster files run is the one the Dockerfile's header says to build.
    assert f"-t {_image_of_rayjob()} ." in text
    # Every runtime dependency of the package is pinned, and torch is the CUDA build the docs name.
    for dep in ("torch", "torchvision", "ray", "mlflow", "decord", "av", "pyarrow", "numpy", "pyyaml", "pillow"):
        assert dep in pins, dep
    assert pins["torch"] == "2.14.1" and pins["nvidia-cuda-runtime"].startswith("13.0.")
    docs = DOCS.read_text()
    assert "580.65.06" in docs and "CUDA 13.0" in docs and "cluster-constraints.txt" in docs


def test_readme_and_ci_install_with_the_cluster_constraints():
    """The tests run with the versions the cluster image pins: both README set-up commands install with
    the constraints file, and .ci/run calls exactly README's test command (a new release on the
    registry then changes neither the tests' environment nor the image's)."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    quick = [b for b in blocks[:2]]
    assert len(quick) == 2 and all("pip install -q -c requirements/cluster-constraints.txt -e" in b for b in quick)
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == quick[1], (ci[-1], quick[1])


def test_constraints_match_the_installed_environment():
    """requirements/cluster-constraints.txt is what tools/write_constraints.py writes from this venv
    (README's commands install with it, so this holds on a fresh clone)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(REPO / "tools" / "write_constraints.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_commands_in_cluster_docs_exist_and_load():
    cmds = _job_commands(DOCS.read_text())
    assert cmds
    for cmd in cmds:  # without placeholders: <model.pt>, $TMP/work, ...
        _check_command([a for a in cmd if "<" not in a and "$" not in a and a != "..."])


def test_a_missing_tracked_doc_is_a_failure(tmp_path):
    """This module's doc test run on a checkout without docs/cluster.md fails: it skipped (so
    deleting the doc made the suite pass)."""
    (tmp_path / "tests").mkdir()
    shutil.copy2(__file__, tmp_path / "tests" / "test_cluster_files.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this copy's own root: no ini file above it is read
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_cluster_files.py::test_commands_in_cluster_docs_exist_and_load"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "1 failed" in res.stdout and "skipped" not in res.stdout, res.stdout[-3000:]
    assert "docs/cluster.md" in res.stdout


def test_documented_job_submission_passes_the_tracking_uri_in_the_runtime_env():
    """The command a user copies from docs/cluster.md: its runtime env (what
    tests/test_integration.py::test_ray_job_submit_with_token_auth submits) declares the tracking
    server in `env_vars`, and its entrypoint is a job command that loads."""
    from doc_commands import user_submit

    sub = user_submit()
    env = sub.runtime_env
    assert set(env) == {"excludes", "env_vars"}
    assert set(env["env_vars"]) == {"MLFLOW_TRACKING_URI"}
    assert {"/.venv/", "/.git/", "/mlruns/"} <= set(env["excludes"])
    assert sub.option("--working-dir") == "."
    assert sub.entrypoint[0] == "python"
    _check_command(sub.entrypoint[1:])
    assert sub.entrypoint[1:6] == ["jobs/train.py", "--config", "configs/lfb_nl.yaml", "--operators", "nl,avg,max"]


def _assert_no_relative_paths(argv: list[str]) -> None:
    """A submitted job's config as given (the entrypoint's --config and overrides) has no relative local
    path, which would resolve against Ray's package cache on the head node (`preflight`)."""
    from lfb_ray.config import load_config
    from lfb_ray.preflight import check_submitted_paths

    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    assert check_submitted_paths(load_config(REPO / config, overrides)) == []


def test_documented_cluster_commands_use_one_storage_root():
    """docs/cluster.md's submission overrode only train.storage_path: `workdir: runs/ava` and `data.root:
    data/ava` of configs/lfb_nl.yaml then resolved against Ray's package cache on the head node."""
    from doc_commands import user_submit

    _assert_no_relative_paths(user_submit().entrypoint[1:])


def test_scripts_named_in_the_docs_exist():
    """Every `jobs/`, `tools/`, `research/` or `benchmarks/` script that a document or a config comment
    names is in the repository (scripts that moved leave no stale commands behind)."""
    texts = [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "research").glob("*.md"), *(REPO / "configs").rglob("*.yaml"), REPO / "docker" / "Dockerfile"]
    named = {m.group(0) for path in texts
             for m in re.finditer(r"(?<![\w/.])(?:jobs|tools|research|benchmarks)/[a-z][a-z0-9_]*\.py", path.read_text())}
    assert {"jobs/train.py", "jobs/benchmark.py", "research/probe_bank_reader.py"} <= named
    assert sorted(p for p in named if not (REPO / p).is_file()) == []


def test_scripts_are_plain_scripts_over_the_installed_package():
    """No entry point edits `sys.path`: the package is installed (`pip install -e .`, the Dockerfile's
    `pip install .`), and `ray job submit --working-dir .` puts the working dir on PYTHONPATH."""
    scripts = [p for d in ("jobs", "tools", "research") for p in (REPO / d).glob("*.py")]
    assert scripts
    assert [str(p.relative_to(REPO)) for p in scripts if "sys.path" in p.read_text()] == []


def test_gpu_nodes_have_a_cache_volume_with_a_budget_and_a_driver():
    """Frame stores on S3 were copied whole to every node's cache and never evicted (AVA: ~0.30 TB per
    node); the RayJob GPU pods had no volume for it; cluster.yaml set no ImageId for the GPU nodes."""
    launcher = yaml.safe_load((REPO / "configs" / "cluster" / "cluster.yaml").read_text())
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["ImageId"]
    (budget,) = [o for o in gpu["docker"]["worker_run_options"] if "LFB_RAY_CACHE_MAX_GB=" in o]
    disk_gb = gpu["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert 300 < float(budget.split("=")[1]) < disk_gb  # AVA's frame stores fit, under the disk

    j = yaml.safe_load(RAYJOB.read_text())
    for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert env["LFB_RAY_CACHE"] in mounts and float(env["LFB_RAY_CACHE_MAX_GB"]) > 300
        (vol,) = [v for v in g["template"]["spec"]["volumes"] if v["name"] == mounts[env["LFB_RAY_CACHE"]]]
        size = vol["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"]
        assert float(size.rstrip("Gi")) > float(env["LFB_RAY_CACHE_MAX_GB"])
