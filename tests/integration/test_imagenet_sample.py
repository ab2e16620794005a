"""Real ImageNet JPEGs end to end: train a 1000-way tiny V-MoE on an ImageNet-layout folder built from
../shared/data/imagenet-sample, then msmoe-eval it on val, ImageNet-A/-R (200-class masks) and an
ImageNet-C tree, and check the CLI's figures against a hand computation on the same model.
"""

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
pytestmark = pytest.mark.slow


def link_tree(files, root: Path) -> Path:
    for f in files:
        d = root / f.name.split("_")[0]
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cli):
    files = sorted(SAMPLE.glob("*.JPEG")) if SAMPLE.is_dir() else []
    if len(files) < 10:
        pytest.skip(f"the ImageNet sample JPEGs are not at {SAMPLE} (48 files named <wnid>_<label>.JPEG expected)")
    tmp = tmp_path_factory.mktemp("inet")
    link_tree(files, tmp / "imagenet" / "train")
    link_tree(files, tmp / "imagenet" / "val")
    res = cli(
        "train",
        "--config",
        "configs/imagenet/tiny_synthetic.yaml",
        "data.kind=imagenet",
        f"data.path={tmp / 'imagenet'}",
        f"train.run_dir={tmp / 'run'}",
        "vision.num_classes=1000",
        "vision.image_size=64",
        "vision.patch_size=16",
        "data.batch_size=8",
        "train.max_steps=6",
        "train.eval_every=0",
        "train.progress=false",
        "vision.num_workers=0",
        "checkpoint.every_steps=0",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return tmp, files


def test_training_on_real_jpegs_maps_wnids_to_canonical_classes(trained):
    tmp, files = trained
    from msmoe_dist.checkpoint import read_meta, resolve_checkpoint
    from msmoe_dist.data.imagenet_classes import IMAGENET_WNIDS

    seal = read_meta(resolve_checkpoint(tmp / "run")).data
    assert sorted(seal["classes"]) == sorted({f.name.split("_")[0] for f in files})
    assert set(seal["classes"]) <= set(IMAGENET_WNIDS)
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val.top1" in r for r in rows)
    assert [r for r in rows if "loss" in r][-1]["data.unreadable_images"] == 0


def test_robustness_eval_matches_a_hand_computation(trained, cli):
    tmp, files = trained
    from msmoe_dist.data.imagenet_classes import IMAGENET_WNIDS
    from msmoe_dist.eval.robustness import load_wnids

    a_set = set(load_wnids("imagenet_a"))
    a_files = [f for f in files if f.name.split("_")[0] in a_set]
    assert a_files, "the sample should hold some ImageNet-A classes"
    link_tree(a_files, tmp / "imagenet_a")
    c_root = tmp / "imagenet_c"
    for corruption in ("gaussian_noise", "fog"):
        for sev in range(1, 6):
            link_tree(files[sev::6], c_root / corruption / str(sev))
    out = tmp / "eval.json"
    res = cli(
        "eval",
        "--checkpoint",
        str(tmp / "run"),
        "--imagenet-a",
        str(tmp / "imagenet_a"),
        "--imagenet-c",
        str(c_root),
        "--workers",
        "0",
        "--json",
        str(out),
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "top-1" in res.stderr and "mCE" in res.stderr
    assert report["val"]["num_images"] == len(files)
    assert report["imagenet_a"]["num_images"] == len(a_files)
    c = report["imagenet_c"]
    assert c["partial"] and set(c["per_corruption"]) == {"gaussian_noise", "fog"}

    # By hand: the same weights, the masked argmax over the 200 ImageNet-A columns.
    from msmoe_dist.checkpoint import load_full_weights, resolve_checkpoint
    from msmoe_dist.config.loader import config_from_dict
    from msmoe_dist.data.images import ImageFolderDataset, eval_transform
    from msmoe_dist.models import VisionMoE

    weights, meta = load_full_weights(resolve_checkpoint(tmp / "run"))
    cfg = config_from_dict(meta.config)
    model = VisionMoE(cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    model.load_state_dict(weights)
    model.eval()
    data = ImageFolderDataset(tmp / "imagenet_a", 1000, eval_transform(cfg.vision))
    columns = sorted(IMAGENET_WNIDS.index(w) for w in a_set)
    hits = 0
    with torch.no_grad():
        for i in range(len(data)):
            img, label, _ = data[i]
            logits = model(img[None]).logits[0]
            hits += int(columns[int(logits[columns].argmax())] == label)
    assert report["imagenet_a"]["top1_acc"] == pytest.approx(hits / len(data))

    # mCE by hand from the CLI's own per-severity errors and the shipped AlexNet table.
    from msmoe_dist.eval.robustness import load_alexnet_errors

    alex = load_alexnet_errors()
    for name, row in c["per_corruption"].items():
        errs = [row["errors"][str(s)] if str(s) in row["errors"] else row["errors"][s] for s in range(1, 6)]
        assert row["ce"] == pytest.approx(sum(errs) / 5 / alex[name])


def test_eval_refuses_language_model_flags_on_a_vit(trained, cli):
    tmp, _ = trained
    res = cli("eval", "--checkpoint", str(tmp / "run"), "--attack")
    assert res.returncode == 2 and "--attack" in res.stderr and "Traceback" not in res.stderr
    missing = cli("eval", "--checkpoint", str(tmp / "run"), "--imagenet-r", str(tmp / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
