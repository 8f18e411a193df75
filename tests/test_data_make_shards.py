"""make_shards round trips: ImageFolder -> classification shards, COCO captions -> retrieval shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torchvision.transforms as T
from PIL import Image

from datamodules import WebDatasetDataModule
from regcache.data.make_shards import main

TF = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])


def _img(path: Path, v: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), (v * 20 % 256, 50, 100)).save(path, format=fmt)


def test_imagefolder_roundtrip(tmp_path):
    src = tmp_path / "folder"
    counts = {"cat": 3, "dog": 4, "sea_lion": 2}
    for c, n in counts.items():
        for i in range(n):
            _img(src / c / f"{i}.png", i)
    (src / "dog" / "notes.txt").write_text("not an image")
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("a photo of a {c}.\nart of the {c}.\n")
    out = tmp_path / "shards"
    assert main(["imagefolder", str(src), str(out), "--shard-size", "4", "--templates", str(tpl)]) == 0
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    with tarfile.open(out / "test" / "0.tar") as tf:
        names = tf.getnames()
    assert names[:2] == ["s0000000.png", "s0000000.cls"]
    # original bytes kept by default
    with tarfile.open(out / "test" / "0.tar") as tf:
        assert tf.extractfile("s0000000.png").read() == (src / "cat" / "0.png").read_bytes()

    dm = WebDatasetDataModule(out, TF, num_workers=2, batch_size=4)
    assert dm.classnames == ["cat", "dog", "sea_lion"]
    assert dm.templates == ["a photo of a {c}.", "art of the {c}."]
    assert dm.task == "classification"
    labels = [lab for b in dm.val_dataloader() for lab in b["label"].tolist()]
    assert sorted(labels) == [0] * 3 + [1] * 4 + [2] * 2

    # re-encoding + default templates
    out2 = tmp_path / "shards_webp"
    assert main(["imagefolder", str(src), str(out2), "--image-format", "webp", "--split", "val"]) == 0
    with tarfile.open(out2 / "val" / "0.tar") as tf:
        assert tf.getnames()[0] == "s0000000.webp"
    assert "{c}" in (out2 / "zeroshot_classification_templates.txt").read_text()
    dm2 = WebDatasetDataModule(out2, TF, eval_split="val", num_workers=0)
    assert sum(len(b["label"]) for b in dm2.val_dataloader()) == 9


def _coco(tmp_path, n_img=6):
    imgs = tmp_path / "images"
    images, anns = [], []
    for i in range(n_img):
        name = f"COCO_val2014_{i:012d}.jpg"
        _img(imgs / name, i, "JPEG")
        images.append({"id": 100 + i, "file_name": name})
        for j in range(5):
            anns.append({"id": 1000 * i + j, "image_id": 100 + i, "caption": f" image {i}  caption {j} \n"})
    cj = tmp_path / "captions.json"
    cj.write_text(json.dumps({"images": images, "annotations": anns}))
    return imgs, cj


def test_coco_retrieval_roundtrip(tmp_path):
    imgs, cj = _coco(tmp_path)
    out = tmp_path / "coco"
    assert main(["coco", str(imgs), str(cj), str(out), "--shard-size", "4"]) == 0
    assert (out / "dataset_type.txt").read_text().strip() == "retrieval"
    assert (out / "test" / "nshards.txt").read_text().strip() == "2"
    dm = WebDatasetDataModule(out, TF, num_workers=2, batch_size=4)
    assert dm.task == "retrieval"
    caps = {}
    for b in dm.val_dataloader():
        assert "label" not in b and b["image"].shape[1:] == (3, 16, 16)
        for k, c in zip(b["key"], b["captions"], strict=False):
            caps[k] = c
    assert len(caps) == 6 and all(len(c) == 5 for c in caps.values())
    assert caps["s0000002"][3] == "image 2 caption 3"


def test_coco_with_karpathy_split(tmp_path):
    imgs, cj = _coco(tmp_path)
    kp = {
        "images": [
            {"filepath": "", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": 100 + i,
             "split": "test" if i in (1, 4) else "train", "sentences": [{"raw": "x"}]}
            for i in range(6)
        ]
    }  # fmt: skip
    kj = tmp_path / "dataset_coco.json"
    kj.write_text(json.dumps(kp))
    out = tmp_path / "karpathy"
    assert main(["coco", str(imgs), str(cj), str(out), "--karpathy", str(kj)]) == 0
    dm = WebDatasetDataModule(out, TF, num_workers=0)
    batches = list(dm.val_dataloader())
    caps = [c for b in batches for c in b["captions"]]
    assert len(caps) == 2 and caps[0][0] == "image 1 caption 0" and len(caps[1]) == 5
    # Karpathy only (captions from its sentences)
    out2 = tmp_path / "karpathy_only"
    assert main(["coco", str(imgs), str(out2), "--karpathy", str(kj)]) == 0
    dm2 = WebDatasetDataModule(out2, TF, num_workers=0)
    assert [c for b in dm2.val_dataloader() for c in b["captions"]] == [["x"], ["x"]]


def test_cli_errors(tmp_path, capsys):
    assert main(["imagefolder", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "ImageFolder" in capsys.readouterr().out
