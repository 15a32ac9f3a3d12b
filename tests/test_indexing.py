import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from crosstvr import CrossTVRModel
from crosstvr.cli import main
from crosstvr.default_model import build_tiny_model, load_default_model
from crosstvr.index_catalog import IndexCatalog
from crosstvr.indexing import IndexMismatchError, VideoIndex, write_contact_sheet
from crosstvr.synthetic import write_sample_library


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny_model()


@pytest.fixture(scope="module")
def library_source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("library")
    names = sorted(write_sample_library(directory / "a", count=9, seed=1))  # nine distinct scenes
    (directory / "b" / "nested").mkdir(parents=True)
    for name in names[6:]:
        shutil.move(directory / "a" / name, directory / "b" / "nested" / name)
    return directory


@pytest.fixture
def library(library_source, tmp_path):
    shutil.copytree(library_source, tmp_path / "library")
    return tmp_path / "library"


def index_contents(index: VideoIndex) -> dict[str, torch.Tensor]:
    """Every indexed video's stage-1 embedding and stage-2 tokens, by path."""
    contents = {}
    for path, embeds in zip(index.paths, index.stage1_embeddings()):
        entry = index.entry(path)
        contents[path] = (embeds, index._reader.row(f"{entry['chunk']}.safetensors", entry["row"])["vision_tokens"])
    return contents


def test_index_and_search_round_trip(library, tmp_path):
    model, processor = load_default_model()
    index = VideoIndex.build(library, tmp_path / "index", model, processor, chunk_size=4, num_workers=0)
    update = index.last_update
    assert update["total"] == len(index) == 9 and update["added"] == 9 and update["skipped"] == {}
    assert list(index.changes("added")) == sorted(index.paths)
    assert all(path.startswith(str(library)) for path in index.paths)

    # Stage-1 scores are the model's cosine similarities; the top K is re-ranked, the rest keeps stage-1 order.
    query = "a red circle moves left"
    text = processor(text=[query])
    with torch.no_grad():
        text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])
    similarity = (index.stage1_embeddings() @ text_embeds[0]).tolist()
    result = index.search(query, k=9, top_k_rerank=3)
    assert [hit.rank for hit in result.hits] == list(range(1, 10))
    for hit in result.hits:
        assert hit.coarse_score == pytest.approx(similarity[index.paths.index(hit.path)], abs=1e-5)
    assert [hit.reranked for hit in result.hits] == [True] * 3 + [False] * 6
    rest = [hit.coarse_score for hit in result.hits[3:]]
    assert rest == sorted(rest, reverse=True) and min(h.coarse_score for h in result.hits[:3]) >= max(rest)
    stage_one = index.search(query, k=4, rerank=False)
    assert [hit.coarse_score for hit in stage_one.hits] == pytest.approx(sorted(similarity, reverse=True)[:4], abs=1e-5)

    reopened = VideoIndex.open(tmp_path / "index")  # loads the model the catalog names: the embedded default
    assert [hit.path for hit in reopened.search(query, k=5, top_k_rerank=3).hits] == [h.path for h in result.hits[:5]]


def test_faiss_and_exact_search_agree(model_and_processor, library, tmp_path):
    pytest.importorskip("faiss")
    model, processor = model_and_processor
    with_faiss = VideoIndex.build(library, tmp_path / "faiss", model, processor, faiss_index="hnsw", num_workers=0)
    exact = VideoIndex.build(library, tmp_path / "exact", model, processor, faiss_index=None, num_workers=0)
    assert with_faiss.settings["faiss"]["kind"] == "hnsw" and exact.settings["faiss"] is None
    assert os.path.exists(tmp_path / "faiss" / with_faiss.settings["faiss"]["file"])
    for query in ("a blue square moves up", "a yellow triangle moves right", "a green circle"):
        approximate, reference = with_faiss.search(query, k=9, rerank=False), exact.search(query, k=9, rerank=False)
        assert [h.path for h in approximate.hits] == [h.path for h in reference.hits]
        for a, b in zip(approximate.hits, reference.hits):
            assert a.coarse_score == pytest.approx(b.coarse_score, abs=1e-5)
        assert [h.path for h in with_faiss.search(query, k=5).hits] == [h.path for h in exact.search(query, k=5).hits]


def test_resume_after_a_kill_gives_the_same_index(model_and_processor, library, tmp_path, monkeypatch):
    model, processor = model_and_processor
    reference = VideoIndex.build(library, tmp_path / "reference", model, processor, chunk_size=2, num_workers=0)

    from crosstvr import indexing

    original, calls = indexing.encode_videos, []

    def killed_during_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(indexing, "encode_videos", killed_during_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        VideoIndex.build(library, tmp_path / "resumed", model, processor, chunk_size=2, num_workers=0)
    partial = IndexCatalog(IndexCatalog.path_in(tmp_path / "resumed"))  # what a kill leaves: the finished chunks
    assert len(partial) == 4 and len(partial.chunks()) == 2
    partial.close()
    assert not [name for name in os.listdir(tmp_path / "resumed" / "chunks") if "partial" in name]
    monkeypatch.setattr(indexing, "encode_videos", original)
    calls.clear()
    monkeypatch.setattr(indexing, "encode_videos", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    resumed = VideoIndex.build(library, tmp_path / "resumed", model, processor, chunk_size=2, num_workers=0)
    assert len(calls) == 3  # only the 3 unfinished chunks of 2, 2 and 1 videos
    assert resumed.last_update["total"] == 9
    assert sorted(os.listdir(tmp_path / "resumed" / "chunks")) == sorted(os.listdir(tmp_path / "reference" / "chunks"))
    expected, actual = index_contents(reference), index_contents(resumed)
    assert expected.keys() == actual.keys()
    for path in expected:
        for a, b in zip(actual[path], expected[path]):
            torch.testing.assert_close(a, b)


def test_incremental_updates(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    index = VideoIndex.build(library, tmp_path / "index", model, processor, chunk_size=3, num_workers=0)
    nested = sorted(p for p in index.paths if "nested" in p)
    first = sorted(p for p in index.paths if "nested" not in p)
    before = index_contents(index)

    update = index.add(library, num_workers=0)
    assert update == {"added": 0, "updated": 0, "removed": 0, "skipped": {}, "total": 9}

    shutil.rmtree(library / "b")  # a whole chunk's videos go
    os.remove(first[0])
    shutil.copy(first[2], first[1])  # changed content (and size/mtime)
    write_sample_library(library / "c", count=2, seed=5, size=48)
    chunks_before = index.catalog.chunks()
    update = index.add(library, chunk_size=3, num_workers=0)
    assert (update["removed"], update["updated"], update["added"]) == (4, 1, 2)
    assert list(index.changes("removed")) == sorted([first[0], *nested])
    assert list(index.changes("updated")) == [first[1]]
    assert len(list(index.changes("added"))) == 2 and all("/c/" in path for path in index.changes("added"))
    assert update["total"] == len(index) == 9 - 4 + 2
    after = index_contents(index)
    torch.testing.assert_close(after[first[1]][0], after[first[2]][0])  # re-encoded from its new content
    torch.testing.assert_close(after[first[3]][0], before[first[3]][0])  # untouched videos keep their values
    # The chunk that held only the nested videos is gone from disk and catalog.
    gone = chunks_before - index.catalog.chunks()
    assert gone and not any(name.startswith(tuple(gone)) for name in os.listdir(tmp_path / "index" / "chunks"))


def test_updating_from_another_folder_keeps_the_first_folders_videos(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    index = VideoIndex.build(library / "a", tmp_path / "index", model, processor, num_workers=0, faiss_index=None)
    update = index.add(library / "b", num_workers=0, faiss_index=None)
    assert (update["added"], update["removed"], update["total"]) == (3, 0, 9)
    gone = sorted(p for p in index.paths if "/a/" in p)[0]
    os.remove(gone)  # outside the folder being updated, but no longer on disk
    update = index.add(library / "b", num_workers=0, faiss_index=None)
    assert (update["added"], update["removed"], update["total"]) == (0, 1, 8)
    assert list(index.changes("removed")) == [gone]
    with pytest.raises(ValueError, match="kind='deleted'"):
        index.changes("deleted")


def test_unreadable_files_are_skipped_and_reported(model_and_processor, media_dir, tmp_path, capsys):
    model, processor = model_and_processor
    library = tmp_path / "mixed"
    library.mkdir()
    for name in ("red_circle_left.mp4", "corrupt.mp4", "empty.mp4", "notes.mp4"):
        shutil.copy(os.path.join(media_dir, name), library / name)
    (library / "readme.txt").write_text("not a video, not even by name")
    index = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0)
    assert [os.path.basename(p) for p in index.paths] == ["red_circle_left.mp4"]
    skipped = {os.path.basename(path): reason for path, reason in index.last_update["skipped"].items()}
    assert sorted(skipped) == ["corrupt.mp4", "empty.mp4", "notes.mp4"]
    assert all("could not be decoded" in reason for reason in skipped.values())
    # Unchanged failures are not retried; a repaired file is.
    assert index.add(library, num_workers=0)["skipped"] == {}
    shutil.copy(os.path.join(media_dir, "blue_square_up.mp4"), library / "notes.mp4")
    assert index.add(library, num_workers=0)["added"] == 1 and len(index) == 2
    assert [os.path.basename(p) for p in index.changes("added")] == ["notes.mp4"]

    assert main(["index", str(library), "--index", str(tmp_path / "cli")]) == 0
    captured = capsys.readouterr()
    assert "indexed 2 videos" in captured.out and "skipped" in captured.err and "corrupt.mp4" in captured.err
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(media_dir, "corrupt.mp4"), broken / "a.mp4")
    assert main(["index", str(broken), "--index", str(tmp_path / "nothing")]) == 1
    assert "nothing could be indexed" in capsys.readouterr().err


def test_index_refuses_another_model_or_processor(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0)
    other, _ = build_tiny_model(seed=1)
    with pytest.raises(IndexMismatchError, match="another model \\(the embedded default model\\)"):
        VideoIndex(tmp_path / "index", other, processor)
    _, other_processor = build_tiny_model()
    other_processor.num_frames = 4
    with pytest.raises(IndexMismatchError, match="other frame sampling"):
        VideoIndex(tmp_path / "index", model, other_processor)
    with pytest.raises(FileNotFoundError, match="not a video index"):
        VideoIndex.open(tmp_path / "nowhere")


def test_where_the_model_was_loaded_from_does_not_change_the_model(model_and_processor, library, tmp_path, monkeypatch):
    from crosstvr.video_store import model_fingerprint

    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    relative, absolute = (CrossTVRModel.from_pretrained(path).eval() for path in ("model", tmp_path / "model"))
    assert relative.config._name_or_path != absolute.config._name_or_path
    built = VideoIndex.build(library, tmp_path / "index", relative, processor, num_workers=0)
    assert len(VideoIndex(tmp_path / "index", absolute, processor)) == len(built) > 0
    # An index from before: its fingerprint included `_name_or_path`. It opens, and is recorded anew.
    index = VideoIndex(tmp_path / "index", relative, processor)
    with index.catalog.transaction() as connection:
        index.catalog.set_settings(connection, model=model_fingerprint(relative, with_name_or_path=True))
    assert VideoIndex(tmp_path / "index", relative, processor).catalog.settings()["model"] == model_fingerprint(absolute)
    with pytest.raises(IndexMismatchError, match="another model"):
        VideoIndex(tmp_path / "index", build_tiny_model(seed=1)[0], processor)


def test_index_command_with_reference_frame_decoding(library, tmp_path):
    exact, fast = tmp_path / "exact", tmp_path / "fast"
    assert main(["index", str(library), "--index", str(exact), "--num-workers", "0"]) == 0
    argv = ["index", str(library), "--index", str(fast), "--num-workers", "0", "--decoding", "reference_frames"]
    assert main(argv) == 0
    exact_index, fast_index = VideoIndex.open(exact), VideoIndex.open(fast)
    assert fast_index.paths == exact_index.paths
    # Nearby frames instead of the exact ones: nearly the same embeddings, not a different index.
    similarity = (fast_index.stage1_embeddings() * exact_index.stage1_embeddings()).sum(dim=-1)
    assert (similarity > 0.9).all()


def test_search_command_json_and_contact_sheet(model_and_processor, library, tmp_path, capsys):
    assert main(["index", str(library), "--index", str(tmp_path / "index"), "--num-workers", "0"]) == 0
    capsys.readouterr()
    sheet = tmp_path / "sheet.png"
    args = ["search", str(tmp_path / "index"), "a blue circle moves down", "-k", "4", "--json", "--contact-sheet", str(sheet)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == "a blue circle moves down" and [h["rank"] for h in result["hits"]] == [1, 2, 3, 4]
    image = Image.open(sheet)
    assert image.height >= 4 * 96 and image.width > 4 * 64
    # A frame strip per hit: the sheet is not blank where the thumbnails go.
    assert len(set(image.crop((300, 40, 400, 120)).getdata())) > 2


def test_contact_sheet_survives_a_vanished_file(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    index = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0)
    result = index.search("a red square", k=2)
    os.remove(result.hits[0].path)
    write_contact_sheet(result, tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").height > 0


def test_two_processes_split_the_indexing(library, tmp_path):
    model, processor = load_default_model()  # what the command line indexes with
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crosstvr",
               "index",
               str(library), "--index", str(tmp_path / "two"), "--chunk-size", "2", "--num-workers", "0"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The work is split: the main process's progress bar counts its own chunks (0, 2, 4: 5 videos), not all 9.
    assert "5/5" in result.stderr and "9/9" not in result.stderr, result.stderr[-3000:]
    two = VideoIndex.open(tmp_path / "two")
    one = VideoIndex.build(library, tmp_path / "one", model, processor, chunk_size=2, num_workers=0)
    assert len(two) == 9 and len(two.catalog.chunks()) == 5
    expected, actual = index_contents(one), index_contents(two)
    assert expected.keys() == actual.keys()
    for path in expected:
        torch.testing.assert_close(actual[path][0], expected[path][0])


def test_walking_a_library_lists_every_video_once_with_its_stat(tmp_path):
    from crosstvr.search import find_videos, walk_videos

    (tmp_path / "lib" / "deep" / "er").mkdir(parents=True)
    for name in ("a.mp4", "deep/B.MKV", "deep/er/c.webm", "notes.txt"):
        (tmp_path / "lib" / name).write_bytes(b"x" * len(name))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "d.mp4").write_bytes(b"d")
    os.symlink(tmp_path / "elsewhere" / "d.mp4", tmp_path / "lib" / "link.mp4")  # a link to a file: followed
    os.symlink(tmp_path / "elsewhere", tmp_path / "lib" / "linked-folder")  # a link to a folder: not entered
    os.symlink(tmp_path / "nowhere.mp4", tmp_path / "lib" / "broken.mp4")  # leads nowhere: left out
    found = sorted(walk_videos(tmp_path / "lib"))
    root = str(tmp_path / "lib")
    assert [path for path, _, _ in found] == [f"{root}/a.mp4", f"{root}/deep/B.MKV", f"{root}/deep/er/c.webm",
                                              f"{root}/link.mp4"]
    assert [size for _, size, _ in found] == [5, 10, 14, 1]
    assert found[0][2] == os.stat(found[0][0]).st_mtime_ns
    assert find_videos(tmp_path / "lib") == [path for path, _, _ in found]
    with pytest.raises(NotADirectoryError, match="missing"):
        walk_videos(tmp_path / "missing")  # at the call, before any iteration


def test_connections_that_create_one_catalog_together_all_open_it(tmp_path):
    # What two `torchrun` processes do when they start indexing into a new folder at once. SQLite refuses the switch to
    # WAL without waiting when another connection holds a lock, and a connection may find the file before its
    # creator has written the settings: both happened in a few of a hundred new catalogs with eight openers.
    for trial in range(100):
        path, barrier, settings, errors = IndexCatalog.path_in(tmp_path / str(trial)), threading.Barrier(8), [], []
        os.makedirs(os.path.dirname(path))

        def open_catalog(number: int) -> None:
            barrier.wait()
            try:
                catalog = IndexCatalog(path)
                catalog.create_settings(format_version=2, opener=number)
                settings.append(catalog.settings())
                catalog.close()
            except sqlite3.Error as error:
                errors.append(error)

        threads = [threading.Thread(target=open_catalog, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert len(settings) == 8 and all(found == settings[0] for found in settings)  # one opener wrote them


def test_ivf_index_trains_on_a_sample_and_finds_every_vector():
    pytest.importorskip("faiss")
    from crosstvr.indexing import build_faiss_index

    generator = np.random.default_rng(0)
    embeddings = generator.standard_normal((3000, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    index, kind, params = build_faiss_index(embeddings, "ivf")
    assert kind == "ivf" and params == {"nlist": 219, "nprobe": 128} and index.ntotal == 3000
    assert index.nprobe == 128
    _, found = index.search(embeddings[:100], 1)
    assert (found[:, 0] == np.arange(100)).mean() >= 0.95
    small, kind, _ = build_faiss_index(embeddings[:500], "ivf")  # too few vectors for lists: exact
    assert kind == "flat" and small.ntotal == 500


def _as_format_one(index_dir) -> None:
    """Rewrite a catalog index as the first format wrote it: one manifest.json, the FAISS index as faiss.index."""
    catalog = IndexCatalog(IndexCatalog.path_in(index_dir))
    settings = catalog.settings()
    videos = {path: catalog.entry(path) for _, path, _, _ in catalog.rows_in_order()}
    manifest = {
        "format_version": 1, "model_name": settings["model_name"], "model": settings["model"],
        "processor": settings["processor"], "videos": videos,
        "skipped": {path: list(value) for path, value in catalog.skipped().items()},
        "chunks": sorted(catalog.chunks()),
        "faiss": {key: value for key, value in settings["faiss"].items() if key != "file"},
    }
    catalog.close()
    os.replace(os.path.join(index_dir, settings["faiss"]["file"]), os.path.join(index_dir, "faiss.index"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(IndexCatalog.path_in(index_dir) + suffix):
            os.remove(IndexCatalog.path_in(index_dir) + suffix)
    (index_dir / "manifest.json").write_text(json.dumps(manifest))


def test_first_format_index_is_migrated_on_open(model_and_processor, media_dir, library, tmp_path):
    pytest.importorskip("faiss")
    model, processor = model_and_processor
    shutil.copy(os.path.join(media_dir, "corrupt.mp4"), library / "corrupt.mp4")
    index = VideoIndex.build(library, tmp_path / "index", model, processor, chunk_size=4, num_workers=0)
    queries = ("a red circle moves left", "a blue square")
    before = [[(h.path, round(h.score, 5)) for h in index.search(q, k=6, top_k_rerank=3).hits] for q in queries]
    contents = index_contents(index)
    index.catalog.close()
    _as_format_one(tmp_path / "index")

    migrated = VideoIndex(tmp_path / "index", model, processor)
    assert not (tmp_path / "index" / "manifest.json").exists() and not (tmp_path / "index" / "faiss.index").exists()
    assert migrated.settings["format_version"] == 2 and migrated.settings["faiss"]["kind"] == "flat"
    assert [os.path.basename(p) for p in migrated.catalog.skipped()] == ["corrupt.mp4"]
    after = [[(h.path, round(h.score, 5)) for h in migrated.search(q, k=6, top_k_rerank=3).hits] for q in queries]
    assert after == before
    assert index_contents(migrated).keys() == contents.keys()
    # Updating the migrated index works as on any other: the unchanged library adds nothing, a new video is added.
    assert migrated.add(library, num_workers=0)["added"] == 0
    write_sample_library(library / "new", count=1, seed=9)
    assert migrated.add(library, num_workers=0)["added"] == 1 and len(migrated) == 10


def test_index_of_an_unknown_format_is_refused_with_the_fix(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    index = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0)
    with index.catalog.transaction() as connection:
        index.catalog.set_settings(connection, format_version=99)
    with pytest.raises(IndexMismatchError, match="index format 99.*rebuild it"):
        VideoIndex(tmp_path / "index", model, processor)


def test_a_changed_video_alone_in_its_chunk_is_re_encoded(model_and_processor, tmp_path):
    model, processor = model_and_processor
    library = tmp_path / "one"
    write_sample_library(library, count=1, seed=3)
    index = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0, faiss_index=None)
    (path,) = index.paths
    before = index.stage1_embeddings().clone()
    write_sample_library(tmp_path / "other", count=1, seed=4, size=48)
    shutil.copy(tmp_path / "other" / os.path.basename(path), path)  # same name, other content
    update = index.add(library, num_workers=0, faiss_index=None)
    assert update["updated"] == 1 and list(index.changes("updated")) == [path] and update["total"] == len(index) == 1
    assert not torch.allclose(index.stage1_embeddings(), before)
    assert index.search("a red circle", k=1).hits[0].path == path


def test_search_follows_an_update_made_by_another_index_object(model_and_processor, library, tmp_path):
    pytest.importorskip("faiss")
    model, processor = model_and_processor
    searcher = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0)
    query = "a green triangle moves down"
    searcher.search(query, k=3)  # loads generation 1's FAISS index
    write_sample_library(library / "later", count=3, seed=11)
    shutil.rmtree(library / "b")
    updater = VideoIndex(tmp_path / "index", model, processor)
    updater.add(library, num_workers=0)  # renumbers the positions: the searcher's FAISS rows mean other videos now
    reference = VideoIndex.build(library, tmp_path / "fresh", model, processor, num_workers=0)
    for rerank in (False, True):
        found = searcher.search(query, k=9, rerank=rerank)
        expected = reference.search(query, k=9, rerank=rerank)
        assert [(h.path, round(h.score, 5)) for h in found.hits] == [(h.path, round(h.score, 5)) for h in expected.hits]
    assert [name for name in os.listdir(tmp_path / "index") if name.startswith("faiss")] == ["faiss-2.index"]


def test_ivfpq_fits_its_byte_budget_and_finds_neighbours():
    faiss = pytest.importorskip("faiss")
    from crosstvr.indexing import IVFPQ_SHORTLIST, build_faiss_index

    generator = np.random.default_rng(0)
    centres = generator.standard_normal((50, 64)).astype(np.float32)
    embeddings = centres[generator.integers(0, 50, 12_000)] + 0.3 * generator.standard_normal((12_000, 64),
                                                                                             dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    index, kind, params = build_faiss_index(embeddings, "ivfpq")
    assert kind == "ivfpq" and params["m"] == 32 and params["shortlist"] == IVFPQ_SHORTLIST  # 32 B codes + 8 B ids
    assert index.code_size + 8 <= 64 and isinstance(index, faiss.IndexIVFPQ)
    _, found = index.search(embeddings[:50], 4 * 15)
    assert np.mean([row in hits for row, hits in zip(range(50), found)]) >= 0.9
    small, kind, _ = build_faiss_index(embeddings[:5000], "ivfpq")  # too few to train 256 centroids per code: exact
    assert kind == "flat"


def test_rescore_exactly_ranks_the_shortlist_by_inner_product():
    from crosstvr.indexing import rescore_exactly

    embeddings = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.6, 0.8], [-1, 0]], dtype=np.float16)
    scores, positions = rescore_exactly(embeddings, np.array([4, 3, 0, 2, 3]), np.array([0.0, 1.0]), 3)
    assert positions.tolist() == [2, 3, 0]  # 0.8 twice (ties by position, the repeated candidate once), then 0
    np.testing.assert_allclose(scores, [0.8, 0.8, 0.0], atol=1e-3)


def _coarse_ivfpq(embeddings, kind, shortlist: int | None = 16):
    """A deliberately coarse IVF-PQ (2-bit codes) over a library too small for the real one; its shortlist holds the
    whole library, so that search must find exactly what exact search finds."""
    import faiss

    dim = embeddings.shape[1]
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, 1, dim // 4, 2, faiss.METRIC_INNER_PRODUCT)  # 4 centroids
    index.train(embeddings)
    index.add(embeddings)
    params = {"nlist": 1, "m": dim // 4, "nbits": 2, "nprobe": 1}
    return index, "ivfpq", {**params, "shortlist": shortlist} if shortlist else {**params, "rescore": 4}


def test_product_quantised_shortlist_is_re_scored_exactly(model_and_processor, library, tmp_path, monkeypatch):
    """An IVF-PQ index's scores are approximate; search re-scores its shortlist with the exact embeddings, which the
    index writes beside the FAISS file (and replaces with each generation)."""
    pytest.importorskip("faiss")
    import crosstvr.indexing

    model, processor = model_and_processor
    exact = VideoIndex.build(library, tmp_path / "exact", model, processor, faiss_index=None, num_workers=0)
    monkeypatch.setattr(crosstvr.indexing, "build_faiss_index", _coarse_ivfpq)
    index = VideoIndex.build(library, tmp_path / "pq", model, processor, faiss_index="ivfpq", num_workers=0)
    info = index.settings["faiss"]
    assert info["embeddings_file"] == "stage1-1.f32"
    stored = np.fromfile(tmp_path / "pq" / info["embeddings_file"], dtype=np.float32).reshape(9, -1)
    np.testing.assert_array_equal(stored, index.stage1_embeddings().numpy())
    for query in ("a blue square moves up", "a yellow triangle moves right"):
        for rerank in (False, True):
            found, expected = index.search(query, k=3, rerank=rerank), exact.search(query, k=3, rerank=rerank)
            assert [(h.path, round(h.score, 5)) for h in found.hits] == [
                (h.path, round(h.score, 5)) for h in expected.hits]
    assert [h.path for h in index.search(query, k=3, nprobe=1).hits] == [h.path for h in found.hits]
    write_sample_library(library / "later", count=1, seed=12)
    index.add(library, faiss_index="ivfpq", num_workers=0)
    assert sorted(name for name in os.listdir(tmp_path / "pq") if name.startswith(("faiss", "stage1"))) == [
        "faiss-2.index", "stage1-2.f32"]


def test_ivfpq_index_from_before_the_embeddings_file_re_scores_from_the_chunks(model_and_processor, library, tmp_path):
    faiss = pytest.importorskip("faiss")
    model, processor = model_and_processor
    exact = VideoIndex.build(library, tmp_path / "exact", model, processor, faiss_index=None, num_workers=0)
    index = VideoIndex.build(library, tmp_path / "pq", model, processor, num_workers=0)
    coarse, _, params = _coarse_ivfpq(index.stage1_embeddings().numpy(), "ivfpq", shortlist=None)
    faiss.write_index(coarse, str(tmp_path / "pq" / "faiss-9.index"))
    index.catalog.renumber(9, faiss={"kind": "ivfpq", "params": params, "count": 9, "file": "faiss-9.index"})
    for rerank in (False, True):
        query = "a blue square moves up"
        found, expected = index.search(query, k=3, rerank=rerank), exact.search(query, k=3, rerank=rerank)
        assert [(h.path, round(h.score, 5)) for h in found.hits] == [(h.path, round(h.score, 5)) for h in expected.hits]


def test_search_knobs_per_query(library, tmp_path, capsys):
    pytest.importorskip("faiss")
    model, processor = load_default_model()  # what the command line searches with
    hnsw = VideoIndex.build(library, tmp_path / "hnsw", model, processor, faiss_index="hnsw", num_workers=0)
    query = "a red square moves left"
    reference = [h.path for h in hnsw.search(query, k=5, rerank=False).hits]
    assert [h.path for h in hnsw.search(query, k=5, rerank=False, ef_search=16).hits] == reference
    assert hnsw._faiss_index.hnsw.efSearch == 16
    hnsw.search(query, k=5)  # the next search without the knob is back at the index's setting
    assert hnsw._faiss_index.hnsw.efSearch == 128
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes.*is hnsw"):
        hnsw.search(query, nprobe=8)
    assert main(["search", str(tmp_path / "hnsw"), query, "--nprobe", "8"]) == 2
    assert "nprobe applies to IVF indexes" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "hnsw"), query, "--ef-search", "32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 9


def test_exact_search_during_another_objects_update_sees_the_last_generation(model_and_processor, library, tmp_path):
    model, processor = model_and_processor
    searcher = VideoIndex.build(library, tmp_path / "index", model, processor, num_workers=0, faiss_index=None)
    query = "a blue circle moves up"
    before = [(h.path, round(h.score, 5)) for h in searcher.search(query, k=9, rerank=False).hits]
    write_sample_library(library / "later", count=3, seed=12)
    seen = []

    def search_meanwhile(done, total):  # called as the updater encodes; earlier chunks are recorded by then
        seen.append([(h.path, round(h.score, 5)) for h in searcher.search(query, k=9, rerank=False).hits])

    updater = VideoIndex(tmp_path / "index", model, processor)
    updater.add(library, num_workers=0, chunk_size=1, faiss_index=None, on_progress=search_meanwhile)
    assert len(seen) == 3 and all(hits == before for hits in seen)  # new videos are recorded but not numbered yet
    assert len(searcher.search(query, k=12, rerank=False).hits) == 12  # the new generation, after the update


def test_int8_tokens_round_trip_within_half_a_step_per_token():
    from crosstvr.video_store import dequantize_tokens, quantize_tokens

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3, 5, 16, generator=generator) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0])[:, None]
    tokens[0, 0, 0] = 0.0  # an all-zero token must not divide by zero
    quantized, scales = quantize_tokens(tokens)
    assert quantized.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (2, 3, 5)
    assert quantized.abs().max() == 127  # the largest channel of every non-zero token uses the whole range
    restored = dequantize_tokens(quantized, scales)
    assert torch.isfinite(restored).all() and (restored[0, 0, 0] == 0).all()
    # Per channel at most half a step of that token's own scale (plus float16's rounding of the scale).
    error = (restored - tokens).abs()
    assert (error <= scales.float().unsqueeze(-1) * 0.51 + 1e-3 * tokens.abs()).all()


def test_token_storage_int8_and_none(library, tmp_path):
    from safetensors import safe_open

    model, processor = load_default_model()  # trained: a random fine module magnifies small changes of its input
    indexes = {
        storage: VideoIndex.build(library, tmp_path / storage, model, processor, token_storage=storage,
                                  faiss_index=None, num_workers=0)
        for storage in ("float16", "int8", "none")
    }

    def chunk_keys(index):
        chunk_dir = os.path.join(index.index_dir, "chunks")
        keys = set()
        for name in os.listdir(chunk_dir):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(chunk_dir, name), framework="pt") as file:
                    keys |= {(key, str(file.get_slice(key).get_dtype())) for key in file.keys()}
        return keys

    assert ("vision_tokens", "F16") in chunk_keys(indexes["float16"])
    assert {("vision_tokens", "I8"), ("vision_token_scales", "F16")} <= chunk_keys(indexes["int8"])
    assert not {key for key, _ in chunk_keys(indexes["none"])} & {"vision_tokens", "vision_token_scales"}
    assert indexes["int8"].settings["token_storage"] == "int8"

    reference = index_contents(indexes["float16"])
    for path, (embeds, tokens) in index_contents(indexes["int8"]).items():
        assert torch.equal(embeds, reference[path][0])
        step = tokens.abs().amax(dim=-1, keepdim=True) / 127
        assert ((tokens - reference[path][1].float()).abs() <= step * 0.51 + 1e-3).all()

    # Every storage re-ranks the same K candidates to (nearly) the same scores: "none" recomputes the tokens (float32
    # against float16's rounding); int8's rounding (at most s/2 per channel) moves p(match) of the embedded default by
    # about 0.002, an amount that depends on the model (the README's token-storage figures).
    tolerance = {"int8": 5e-3, "none": 2e-3}
    for query in ("a red circle moves left", "big blue square goes up, then small red circle goes down"):
        results = {storage: index.search(query, k=6, top_k_rerank=4) for storage, index in indexes.items()}
        for storage in ("int8", "none"):
            assert [h.path for h in results[storage].stage1_hits] == [h.path for h in results["float16"].stage1_hits]
            fine = {h.path: h.fine_score for h in results[storage].hits if h.reranked}
            expected = {h.path: h.fine_score for h in results["float16"].hits if h.reranked}
            assert fine.keys() == expected.keys()
            for path, score in expected.items():
                assert fine[path] == pytest.approx(score, abs=tolerance[storage]), (storage, fine[path] - score)

    # "none" needs the files it re-ranks: a changed one is refused with the fix, from the API and the CLI.
    victim = results["none"].hits[0].path
    with open(victim, "ab") as file:
        file.write(b"\0")
    with pytest.raises(FileNotFoundError, match="run `crosstvr index` on the library again"):
        indexes["none"].search("a red circle moves left", k=6, top_k_rerank=9)
    assert indexes["none"].search("a red circle moves left", k=3, rerank=False).hits  # stage 1 still answers


def test_token_storage_is_fixed_when_the_index_is_created(model_and_processor, library, tmp_path, capsys):
    model, processor = model_and_processor
    VideoIndex.build(library, tmp_path / "index", model, processor, token_storage="int8", num_workers=0)
    assert VideoIndex(tmp_path / "index", model, processor).token_storage == "int8"  # left out: the index's
    with pytest.raises(IndexMismatchError, match="keeps its stage-2 tokens as int8, not none"):
        VideoIndex(tmp_path / "index", model, processor, token_storage="none")
    argv = ["index", str(library), "--index", str(tmp_path / "cli"), "--num-workers", "0", "--token-storage", "none"]
    assert main(argv) == 0
    assert VideoIndex.open(tmp_path / "cli").token_storage == "none"
    capsys.readouterr()
    assert main([*argv[:-1], "float16"]) == 2
    assert "keeps its stage-2 tokens as none, not float16" in capsys.readouterr().err
