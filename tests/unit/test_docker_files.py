"""Static checks of the Docker files and the cluster test scripts (docker/test_docker.sh and
launch/test_slurm.sh build and run them for real; they are opt-in: CI_DOCKER=1 / CI_SLURM=1 .ci/run)."""

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def readme_install_command():
    m = re.search(r'pip install -e "\.\[dev,vision\]"', (ROOT / "README.md").read_text())
    assert m, "README no longer shows the install command"
    return m.group(0)


def dockerfile():
    return (DOCKER / "Dockerfile").read_text()


def test_dockerfile_base_image_is_an_argument_defaulting_to_the_official_pytorch_cuda_image():
    text = dockerfile()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert default.startswith("pytorch/pytorch:") and "cuda" in default and "devel" in default
    assert re.findall(r"^FROM\s+(.+)$", text, re.M) == ["${BASE_IMAGE}"]


def test_dockerfile_installs_with_the_readme_command_and_the_ci_versions():
    text = dockerfile()
    run_lines = " ".join(re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M))
    assert readme_install_command() in run_lines and "python3 -m venv" in run_lines
    assert "PIP_CONSTRAINT=docker/constraints.txt" in run_lines
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in copied.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which is not in the repository"


def test_dockerfile_runs_as_a_user_and_writes_to_the_runs_volume():
    text = dockerfile()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r'^VOLUME \[.*"/runs".*\]$', text, re.M)
    assert "ln -s /runs runs" in text, "the README's runs/... must land on the /runs volume"


def test_the_ca_bundle_is_a_build_secret_never_copied_into_the_image():
    text = dockerfile()
    assert "--mount=type=secret,id=pip_cert" in text
    for line in re.findall(r"^(?:COPY|ADD|ENV) .*$", text, re.M):
        assert "cert" not in line.lower() and "/run/secrets" not in line, line


def test_constraints_pin_the_pyproject_ranges():
    """Every pin names a declared dependency and satisfies its range in pyproject.toml; torch, torchvision
    and DeepSpeed (the pinned stack) are among them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = {r.name.lower(): r.specifier for r in declared}
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    assert {"torch", "torchvision", "deepspeed"} <= set(pins)
    for name, version in pins.items():
        assert name in ranges, f"constraints.txt pins {name}, which pyproject.toml does not declare"
        assert ranges[name].contains(version), f"{name}=={version} is outside pyproject's {ranges[name]}"


def test_dockerignore_keeps_outputs_out_and_sources_in():
    ignored = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip()[:1] not in ("", "#")]
    for must in (".venv", "runs", "data_cache", ".git"):
        assert must in ignored, f".dockerignore must exclude {must}"
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile(), re.M):
        for part in copied.split():
            assert part not in ignored and part.split("/")[0] not in ignored, f"{part} is copied but ignored"


def merged(*files):
    """docker compose's merge of override files, as far as these files use it: mappings merge key by
    key, anything else is replaced."""

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
            return out
        return copy.deepcopy(over)

    spec: dict = {}
    for f in files:
        spec = merge(spec, yaml.safe_load((DOCKER / f).read_text()))
    return {k: v for k, v in spec.items() if not k.startswith("x-")}


def differences(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), (*path, k))
        return out
    return [] if a == b else [".".join(path)]


def test_gpu_and_cpu_variants_differ_only_in_base_image_and_devices():
    gpu = merged("compose.yaml", "compose.gpu.yaml")
    cpu = merged("compose.yaml", "compose.cpu.yaml")
    diff = differences(gpu, cpu)
    allowed = re.compile(r"services\.node\d\.(build\.args|image|deploy)$")
    assert diff and all(allowed.match(d) for d in diff), diff
    for svc in cpu["services"].values():
        assert "deploy" not in svc and list(svc["build"]["args"]) == ["BASE_IMAGE"]
    for svc in gpu["services"].values():
        assert "args" not in svc["build"], "the GPU variant builds on the Dockerfile's default base image"


def test_compose_describes_a_two_node_job_on_loopback():
    spec = merged("compose.yaml", "compose.gpu.yaml")
    nodes = spec["services"]
    assert set(nodes) == {"node0", "node1"}
    assert sorted(n["environment"]["NODE_RANK"] for n in nodes.values()) == ["0", "1"]
    for svc in nodes.values():
        env = svc["environment"]
        assert svc["network_mode"] == "host" and env["RDZV_ENDPOINT"].startswith("127.0.0.1:")
        assert svc["pid"] == "host", "on one network and hostname, torchrun agents need distinct pids"
        assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["NNODES"] == "2"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (ROOT / svc["command"].split()[0]).is_file()
        assert "/runs" in " ".join(svc["volumes"])


def test_compose_gives_each_node_its_own_gpus():
    """Two services with `count: all` would both see every GPU and put each node's LOCAL_RANK 0 on
    GPU 0: every service must name its own GPUs, one rank per GPU, and ep_size must fit the ranks."""
    spec = merged("compose.yaml", "compose.gpu.yaml")
    seen: list[str] = []
    ranks = 0
    for name, svc in spec["services"].items():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["capabilities"] == ["gpu"]
        assert "count" not in dev, f"{name}: count and device_ids exclude each other"
        ids = dev["device_ids"]
        assert ids and all(isinstance(i, str) for i in ids), f"{name}: device_ids must be a list of strings"
        assert int(svc["environment"]["NPROC"]) == len(ids), f"{name}: NPROC must equal the number of its GPUs"
        seen += ids
        ranks += len(ids)
    assert len(seen) == len(set(seen)), f"a GPU is reserved by two services: {seen}"
    assert all(int(svc["environment"]["NNODES"]) == len(spec["services"]) for svc in spec["services"].values())
    for svc in spec["services"].values():
        ep = int(re.search(r"parallel\.ep_size=(\d+)", svc["command"]).group(1))
        assert ranks % ep == 0, f"parallel.ep_size={ep} does not divide the {ranks} ranks"


def test_cluster_doc_says_how_to_scale():
    text = (DOCKER / "CLUSTER.md").read_text()
    assert "device_ids" in text and "Scaling it" in text and "NPROC" in text


SCRIPTS = [DOCKER / "test_docker.sh", ROOT / "launch" / "test_slurm.sh", ROOT / "launch" / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_cluster_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    if shutil.which("shellcheck"):  # where it is installed (apt-get install shellcheck)
        res = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
        assert res.returncode == 0, res.stdout


def test_ci_runs_the_cluster_scripts_only_on_request():
    text = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'"\$\{CI_DOCKER:-0\}" == 1 \]\]; then bash docker/test_docker.sh', text)
    assert re.search(r'"\$\{CI_SLURM:-0\}" == 1 \]\]; then bash launch/test_slurm.sh', text)
