"""Bad dataset metadata and a checkpoint of another architecture: errors that name the file and the fix."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datamodules import WebDatasetDataModule
from datamodules.suite import ValidationSuite
from regcache.data.make_shards import write_imagefolder_shards
from regcache.data.shards import DatasetLayoutError, read_dataset_info, resolve_split_shards
from regcache.loading import CheckpointMismatchError, load_model
from regcache.testbed import CIFAR10_SAMPLE


@pytest.fixture
def layout(tmp_path) -> Path:
    """A two-class classification root in the CLIP_benchmark layout (test + train splits)."""
    src = tmp_path / "folder"
    for c, rgb in (("red", (220, 0, 0)), ("blue", (0, 0, 220))):
        (src / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), rgb).save(src / c / f"{i}.png")
    root = tmp_path / "root"
    for split in ("test", "train"):
        write_imagefolder_shards(src, root, split=split, shard_size=2)
    return root


def _zeroshot_texts(root: Path):
    return WebDatasetDataModule(root, num_workers=0).zeroshot_texts()


def test_empty_classnames_file_names_the_file_and_the_fix(layout):
    (layout / "classnames.txt").write_text("\n  \n")
    with pytest.raises(DatasetLayoutError) as exc:
        read_dataset_info(layout)
    message = str(exc.value)
    assert str(layout / "classnames.txt") in message and "is empty" in message
    assert "one per line in label order" in message and "dataset_type.txt" in message
    with pytest.raises(DatasetLayoutError, match=re.escape(str(layout / "classnames.txt"))):
        WebDatasetDataModule(layout, num_workers=0).setup()


def test_missing_classnames_or_templates_for_a_zero_shot_head(layout):
    names, templates_read = _zeroshot_texts(layout)
    assert names == ["blue", "red"] and templates_read  # make-shards: sorted folders, CLIP's templates
    templates = layout / "zeroshot_classification_templates.txt"
    templates.unlink()
    with pytest.raises(DatasetLayoutError) as exc:
        _zeroshot_texts(layout)
    assert str(templates) in str(exc.value) and "{c}" in str(exc.value) and "one per line" in str(exc.value)
    templates.write_text("a photo of a {c}.\na photo\n")
    with pytest.raises(DatasetLayoutError, match=r"1 template\(s\) without the \{c\} placeholder .*'a photo'"):
        _zeroshot_texts(layout)
    templates.write_text("a photo of a {c}.\n")
    (layout / "classnames.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=re.escape(f"{layout / 'classnames.txt'} is missing")):
        _zeroshot_texts(layout)


def test_suite_reference_texts_name_the_missing_templates_file(layout):
    (layout / "zeroshot_classification_templates.txt").write_text("")
    suite = ValidationSuite(
        root=str(layout.parent),
        datasets={"d": {"path": "root", "ref_split": "train"}},
        reference="d",
        num_workers=0,
    )
    suite.setup()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(layout / "zeroshot_classification_templates.txt"))):
        suite.reference_info()
    with pytest.raises(DatasetLayoutError, match="missing or empty"):
        suite.zeroshot_texts(0)


@pytest.mark.parametrize("content", ["three\n", "0\n", "", "-2"])
def test_bad_nshards_names_the_file_and_the_fix(layout, content):
    nshards = layout / "test" / "nshards.txt"
    nshards.write_text(content)
    with pytest.raises(DatasetLayoutError) as exc:
        resolve_split_shards(layout, "test")
    message = str(exc.value)
    assert message.startswith(f"{nshards}: expected the number of shards")
    assert repr(content.strip()) in message and "write that count into it" in message


def _demo_error(args: list[str], capsys) -> str:
    from regcache.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "unused", "--quiet", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_demo_names_bad_metadata_files(layout, capsys):
    (layout / "test" / "nshards.txt").write_text("many\n")
    err = _demo_error(["--data", str(layout)], capsys)
    assert f"--data {layout}: {layout / 'test' / 'nshards.txt'}: expected the number of shards" in err
    (layout / "test" / "nshards.txt").write_text("5\n")
    err = _demo_error(["--data", str(layout)], capsys)
    assert f"{layout / 'test' / '2.tar'} is missing" in err and "nshards.txt" in err
    (layout / "zeroshot_classification_templates.txt").unlink()
    err = _demo_error(["--data", str(layout)], capsys)
    assert f"{layout / 'zeroshot_classification_templates.txt'} is missing or empty" in err
    other = layout.parent / "other"
    shutil.copytree(CIFAR10_SAMPLE, other)
    (other / "classnames.txt").write_text("")
    err = _demo_error(["--reference", str(other)], capsys)
    assert f"--reference {other}: {other / 'classnames.txt'} is empty" in err


@pytest.fixture(scope="module")
def tiny_vit_checkpoint(tmp_path_factory) -> Path:
    model = load_model("regcache-tiny-vit").model
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name", ["regcache-testbed", "regcache-tiny-openclip"])
def test_checkpoint_of_another_architecture_names_the_file_and_the_fix(tiny_vit_checkpoint, name):
    with pytest.raises(CheckpointMismatchError) as exc:
        load_model(name, str(tiny_vit_checkpoint))
    message = str(exc.value)
    assert message.startswith(f"checkpoint {tiny_vit_checkpoint} does not fit the architecture '{name}'")
    assert "); pass " in message  # the fix follows the cause
    # the checkpoint's own architecture still loads it
    assert load_model("regcache-tiny-vit", str(tiny_vit_checkpoint)).model is not None


def test_timm_checkpoint_of_another_architecture(tmp_path):
    import timm

    other = timm.create_model("vit_regcache_tiny_siglip", num_classes=0, embed_dim=32, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(
        CheckpointMismatchError, match=r"does not fit the architecture 'timm:vit_regcache_tiny_siglip'.*timm"
    ):
        load_model("timm:vit_regcache_tiny_siglip", str(path))
