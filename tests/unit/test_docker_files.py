"""Static checks of the Docker files (no Docker engine runs on the development machine)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def readme_install_command():
    m = re.search(r'pip install -e "\.\[dev,vision\]"', (ROOT / "README.md").read_text())
    assert m, "README no longer shows the install command"
    return m.group(0)


def test_dockerfile_uses_official_pytorch_cuda_image_and_readme_install():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "devel" in base
    run_lines = " ".join(re.findall(r"^RUN (.+)$", text, re.M))
    assert readme_install_command() in run_lines and "python3 -m venv" in run_lines
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        for part in copied.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which is not in the repository"


def test_compose_describes_a_two_node_job():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    nodes = spec["services"]
    assert set(nodes) == {"node0", "node1"}
    ranks = sorted(n["environment"]["NODE_RANK"] for n in nodes.values())
    assert ranks == ["0", "1"]
    for svc in nodes.values():
        env = svc["environment"]
        assert env["NNODES"] == "2" and env["RDZV_ENDPOINT"] == "node0:29500"
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        script = svc["command"].split()[0]
        assert (ROOT / script).is_file()
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_gives_each_node_its_own_gpus():
    """Two services with `count: all` would both see every GPU and put each node's LOCAL_RANK 0 on
    GPU 0: every service must name its own GPUs, one rank per GPU, and ep_size must fit the ranks."""
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    seen: list[str] = []
    ranks = 0
    for name, svc in spec["services"].items():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
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
    text = (ROOT / "docker" / "CLUSTER.md").read_text()
    assert "device_ids" in text and "Scaling it" in text and "NPROC" in text
