import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from crosstvr.cli import main
from crosstvr.default_model import build_tiny_model
from crosstvr.indexing import IndexMismatchError, VideoIndex, read_index_settings
from crosstvr.loading import load_model, resolve_device, resolve_dtype
from crosstvr.synthetic import write_sample_library


def test_demo_runs_on_the_embedded_default_without_download(tmp_path):
    command = [sys.executable, "-m", "crosstvr", "demo", "--num-samples", "5", "--output", str(tmp_path / "demo")]
    result = subprocess.run([*command, "--query", "a red circle moves left", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    (answer,) = output["results"]
    assert answer["query"] == "a red circle moves left"
    assert [hit["rank"] for hit in answer["hits"]] == [1, 2, 3, 4, 5]
    assert len({hit["path"] for hit in answer["hits"]}) == 5
    assert sum(hit["reranked"] for hit in answer["hits"]) == 5  # the default re-ranks its top 5
    assert output["skipped"] == {} and all(os.path.exists(sheet) for sheet in output["contact_sheets"])


def test_demo_on_a_folder_reports_unreadable_files(media_dir, tmp_path, capsys):
    videos = tmp_path / "library"
    (videos / "nested").mkdir(parents=True)
    for name in ("red_circle_left.mp4", "corrupt.mp4", "notes.mp4"):
        shutil.copy(os.path.join(media_dir, name), videos / name)
    shutil.copy(os.path.join(media_dir, "blue_square_up.mp4"), videos / "nested" / "blue.mp4")
    (videos / "readme.txt").write_text("not searched")

    argv = ["demo", "--videos", str(videos), "--output", str(tmp_path / "out"), "--query", "a blue square", "--json"]
    assert main(argv) == 0
    output = json.loads(capsys.readouterr().out)
    hits = output["results"][0]["hits"]
    assert sorted(os.path.relpath(hit["path"], videos) for hit in hits) == ["nested/blue.mp4", "red_circle_left.mp4"]
    assert sorted(os.path.basename(path) for path in output["skipped"]) == ["corrupt.mp4", "notes.mp4"]
    assert all("could not be decoded" in reason for reason in output["skipped"].values())


def test_demo_with_a_saved_model(tmp_path, capsys):
    model, processor = build_tiny_model(seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    argv = ["demo", "--model", str(tmp_path / "model"), "--num-samples", "3", "-k", "2", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.count("query:") == 3 and "rank" in table and "contact sheets:" in table


def test_demo_rebuilds_its_own_index_of_another_model(tmp_path, capsys):
    # A demo folder left by another model (an earlier run with another --model, or the default before an upgrade).
    for seed in (1, 2):
        model, processor = build_tiny_model(seed=seed)
        model.save_pretrained(tmp_path / f"model{seed}")
        processor.save_pretrained(tmp_path / f"model{seed}")
    argv = ["demo", "--num-samples", "3", "-k", "2", "--output", str(tmp_path / "o")]
    assert main([*argv, "--model", str(tmp_path / "model1")]) == 0
    capsys.readouterr()
    assert main([*argv, "--model", str(tmp_path / "model2")]) == 0
    assert "indexed 3 videos" in capsys.readouterr().out


def test_demo_without_videos_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--videos", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 1
    assert "no video could be indexed" in capsys.readouterr().err


def test_device_and_dtype_options(monkeypatch, capsys):
    # "auto" is the device accelerate gives this process: the CPU here when told so (and on a machine without GPUs).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="not one of float32, bfloat16, float16"):
        resolve_dtype("fp8")
    # A device that is not there fails when the command line is read, before any data is loaded.
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "msvd", "--annotations", "a", "--videos", "v", "--device", "cuda:63"])
    assert "argument --device: device 'cuda:63'" in capsys.readouterr().err


def test_an_index_records_its_precision_and_loads_the_model_in_it(tmp_path):
    write_sample_library(tmp_path / "videos", count=4, seed=5)
    half, processor = load_model(device="cpu", dtype="bfloat16")
    VideoIndex.build(tmp_path / "videos", tmp_path / "index", half, processor, num_workers=0)
    assert read_index_settings(tmp_path / "index")["dtype"] == "bfloat16"
    reopened = VideoIndex.open(tmp_path / "index", device="cpu")  # the embedded default, in bfloat16 again
    assert reopened.model.dtype == torch.bfloat16
    # Stage 2 stays float32.
    assert all(p.dtype == torch.float32 for p in reopened.model.fine_module.matching_head.parameters())
    result = reopened.search("a red circle moves left", k=4, top_k_rerank=2)
    assert [hit.reranked for hit in result.hits] == [True, True, False, False]
    full, processor = load_model(device="cpu")
    with pytest.raises(IndexMismatchError, match="load it with dtype=bfloat16"):
        VideoIndex(tmp_path / "index", full, processor)
