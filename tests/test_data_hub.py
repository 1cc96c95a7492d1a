"""`prepare_hub`: offline and unreachable hubs fail at once with what to run instead; a download is prepared."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

from dsvlm.data import hub
from dsvlm.data.hub import prepare_hub
from dsvlm.data.prepared import PreparedDataset
from dsvlm.errors import DataError, DsvlmError


def test_offline_fails_before_any_download_with_instructions(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME: nothing is cached, nothing may be fetched
    out = tmp_path / "lcs"
    with pytest.raises(DataError) as info:
        prepare_hub("liuhaotian/LLaVA-Pretrain", out, progress=False)
    message = str(info.value)
    assert "offline mode (HF_HUB_OFFLINE=1)" in message
    assert "hf download liuhaotian/LLaVA-Pretrain --repo-type dataset --local-dir DIR" in message
    assert "unzip DIR/images.zip -d DIR/images" in message
    assert f"dsvlm prepare llava {out} --align DIR/blip_laion_cc_sbu_558k.json --image-root DIR/images" in message
    assert not out.exists()


def test_unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def unreachable(*args: object, **kwargs: object) -> str:
        calls.append(kwargs)
        raise LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)
    with pytest.raises(DataError, match=r"the hub is unreachable \(ConnectError") as info:
        prepare_hub(
            "org/chat", tmp_path / "out", instruct="data/chat.json", image_root="imgs", revision="v1", progress=False
        )
    assert len(calls) == 1  # no retry loop
    assert calls[0]["allow_patterns"] == ["data/chat.json", "imgs/**"]
    assert "hf download org/chat --repo-type dataset --revision v1 --local-dir DIR" in str(info.value)
    assert "dsvlm prepare llava" in str(info.value) and "--instruct DIR/data/chat.json --image-root DIR/imgs" in str(
        info.value
    )


def test_arguments_are_checked_before_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "snapshot_download", pytest.fail)
    with pytest.raises(DataError, match="--align FILE and/or --instruct FILE"):
        prepare_hub("org/unknown", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"--archive FILE\.zip"):
        prepare_hub("org/unknown", tmp_path / "out", align="a.json", progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(DsvlmError, match="already exists"):
        prepare_hub("liuhaotian/LLaVA-Pretrain", tmp_path / "out", progress=False)


def test_downloaded_repo_is_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    records = [
        {
            "id": "000000012",
            "image": "00000/000000012.jpg",
            "conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "noise"}],
        },
        {
            "id": "000000013",
            "image": "00000/000000013.jpg",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "gone"}],
        },
    ]
    (repo / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.jpg")
    with zipfile.ZipFile(repo / "images.zip", "w") as zf:
        zf.write(tmp_path / "img.jpg", "00000/000000012.jpg")

    def fake_download(repo_id: str, *, local_dir: Path, allow_patterns: list[str], **kwargs: object) -> str:
        assert repo_id == "liuhaotian/LLaVA-Pretrain" and kwargs["repo_type"] == "dataset"
        assert allow_patterns == ["blip_laion_cc_sbu_558k.json", "images.zip"]
        shutil.copytree(repo, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    out = tmp_path / "lcs"
    manifest = prepare_hub("liuhaotian/LLaVA-Pretrain", out, progress=False)
    assert manifest["kind"] == "hub"
    assert manifest["image_root"] == "images"
    assert manifest["options"]["repo_id"] == "liuhaotian/LLaVA-Pretrain"
    assert manifest["options"]["download_dir"] == str((tmp_path / "lcs-hub").resolve())
    assert manifest["splits"]["align"]["records"] == 1
    assert manifest["splits"]["align"]["skipped"] == {"image_missing": 1}
    dataset = PreparedDataset(out)
    record = dataset.records("align")[0]
    assert dataset.image_path(record) == (out / "images" / "00000" / "000000012.jpg").resolve()
    assert dataset.load_image(record).size == (20, 12)
