import json
import os
import shutil
import subprocess
import sys

from crosstvr.cli import main
from crosstvr.default_model import build_default_model


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "crosstvr", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_demo_runs_on_the_embedded_default_without_download():
    result = run_cli("demo", "--num-samples", "5", "--query", "a red circle moves left", "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    (answer,) = output["results"]
    assert answer["query"] == "a red circle moves left"
    assert [hit["rank"] for hit in answer["hits"]] == [1, 2, 3, 4, 5]
    assert len({hit["path"] for hit in answer["hits"]}) == 5
    assert sum(hit["reranked"] for hit in answer["hits"]) == 5  # the default re-ranks its top 5
    assert output["skipped"] == {}


def test_demo_on_a_folder_reports_unreadable_files(media_dir, tmp_path, capsys):
    videos = tmp_path / "library"
    (videos / "nested").mkdir(parents=True)
    for name in ("red_circle_left.mp4", "corrupt.mp4", "notes.mp4"):
        shutil.copy(os.path.join(media_dir, name), videos / name)
    shutil.copy(os.path.join(media_dir, "blue_square_up.mp4"), videos / "nested" / "blue.mp4")
    (videos / "readme.txt").write_text("not searched")

    assert main(["demo", "--videos", str(videos), "--query", "a blue square moves up", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    hits = output["results"][0]["hits"]
    assert sorted(os.path.relpath(hit["path"], videos) for hit in hits) == ["nested/blue.mp4", "red_circle_left.mp4"]
    assert sorted(os.path.basename(path) for path in output["skipped"]) == ["corrupt.mp4", "notes.mp4"]
    assert all("could not be decoded" in reason for reason in output["skipped"].values())


def test_demo_with_a_saved_model(tmp_path, capsys):
    model, processor = build_default_model(seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert main(["demo", "--model", str(tmp_path / "model"), "--num-samples", "3", "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.count("query:") == 3 and "rank" in table


def test_demo_without_videos_fails_clearly(tmp_path, capsys):
    assert main(["demo", "--videos", str(tmp_path)]) == 1
    assert "no video files" in capsys.readouterr().err
