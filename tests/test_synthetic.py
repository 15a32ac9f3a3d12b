"""The synthetic benchmark: its generator, a smoke run of its recipe, and the embedded default model it ships."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import crosstvr.default_model

from crosstvr.data import load_msvd
from crosstvr.synthetic import (
    COLOURS,
    DOT_COLOURS,
    render_scene,
    scene_groups,
    write_benchmark,
    write_sample_library,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _changed_fields(scene, other) -> set[str]:
    return {f.name for f in dataclasses.fields(scene) if getattr(scene, f.name) != getattr(other, f.name)}


def test_scene_groups_are_deterministic_per_seed():
    assert scene_groups(5, seed=3) == scene_groups(5, seed=3)
    assert scene_groups(5, seed=3) != scene_groups(5, seed=4)
    scene = scene_groups(1, seed=3)[0]["base"]
    np.testing.assert_array_equal(render_scene(scene), render_scene(scene))


def test_hard_negatives_differ_in_one_detail_and_in_their_captions():
    for group in scene_groups(20, seed=0):
        base = group["base"]
        assert _changed_fields(base, group["dot_colour"]) == {"dot_colour"}
        assert _changed_fields(base, group["order"]) == {"top_first"}
        moved = "top" if base.top_first else "bottom"
        assert _changed_fields(base, group["direction"]) == {moved}
        assert _changed_fields(getattr(base, moved), getattr(group["direction"], moved)) == {"direction"}
        assert len({scene.captions()[0] for scene in group.values()}) == 4


def test_captions_describe_the_rendered_frames():
    num_frames, size = 12, 64
    for group in scene_groups(10, seed=1):
        for scene in group.values():
            frames = render_scene(scene, num_frames=num_frames, size=size).astype(int)
            caption = scene.captions()[0]
            first, second = scene.order
            # The caption names the objects in the order they move, then the dot.
            assert caption == (f"{first.phrase} goes {first.direction}, then {second.phrase} goes "
                               f"{second.direction}, {scene.dot_colour} dot flashes")
            # The dot has its colour in the middle third of the clip only.
            dot = frames[:, scene.dot_y, scene.dot_x]
            assert (dot[num_frames // 2] == DOT_COLOURS[scene.dot_colour]).all()
            assert not (dot[0] == DOT_COLOURS[scene.dot_colour]).all()
            # The object named first moves (its pixels change) in the first half, the other in the second half.
            for obj, row in ((scene.top, slice(0, size // 2 - 6)), (scene.bottom, slice(size // 2 + 6, size))):
                colour = np.array(COLOURS[obj.colour])
                masks = (frames[:, row] == colour).all(-1)
                first_half = masks[: num_frames // 2] != masks[0]
                second_half = masks[num_frames // 2 :] != masks[num_frames // 2]
                moves_first = first_half.any() and not second_half.any()
                assert moves_first == (obj is first), (caption, obj)
                # The direction of its movement: where its pixels go at the height of the movement.
                peak = num_frames // 4 if obj is first else num_frames // 2 + num_frames // 4
                ys, xs = np.nonzero(masks[peak])
                y0, x0 = np.nonzero(masks[0 if obj is first else num_frames // 2])
                shift = (xs.mean() - x0.mean(), ys.mean() - y0.mean())
                expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[obj.direction]
                assert np.sign(np.round(shift)).tolist() == list(expected), (caption, obj, shift)


def test_write_benchmark_is_read_by_the_msvd_loader(tmp_path):
    splits = write_benchmark(tmp_path, seed=0, groups=(2, 1, 1), num_frames=6)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 4]
    rows = load_msvd(tmp_path / "annotations", tmp_path / "videos", splits=["train", "test"])
    assert len(rows["train"]) == 8 * 3 and len(rows["test"]) == 4
    scenes = json.loads((tmp_path / "annotations" / "scenes.json").read_text())
    groups = scene_groups(4, seed=0)
    for row in rows["test"]:
        record = scenes[row["video_id"]]
        assert row["caption"] == groups[record["group"]][record["variant"]].captions()[0]
    # Same seed, same bytes of annotations.
    again = tmp_path / "again"
    write_benchmark(again, seed=0, groups=(2, 1, 1), num_frames=6)
    for name in ("raw-captions.json", "scenes.json", "test_list.txt"):
        assert (again / "annotations" / name).read_bytes() == (tmp_path / "annotations" / name).read_bytes()


def test_pretraining_rows_of_one_scene_state_share_an_image_id(tmp_path):
    """The recipe pairs every training frame with its frame caption and with its video's caption. Frames of near
    duplicates that show the same state (e.g. before the dot flashes) must be one image for the negatives, or ITM would
    learn that the same picture both matches and does not match "... purple dot flashes"."""
    write_benchmark(tmp_path, seed=0, groups=(2, 1, 1), num_frames=6)
    path = _load_benchmark().captions_with_video_captions(str(tmp_path), str(tmp_path / "mixed.json"))
    frames = json.loads((tmp_path / "annotations" / "frame_captions_train.json").read_text())
    rows = json.loads(open(path).read())
    assert len(rows) == 2 * len(frames)
    assert [row["image_id"] for row in rows] == [frame["caption"] for frame in frames] * 2
    base, dot = (f"{frames[0]['image_id'].split('_')[0]}_{variant}/00" for variant in ("base", "dot_colour"))
    first = {row["image_id"] for row in rows if row["image"].endswith((f"{base}.png", f"{dot}.png"))}
    assert len(first) == 1  # frame 0 of the scene and of its dot-colour variant: one state, no dot yet


def test_generated_media_are_the_same_bytes_in_every_process(tmp_path):
    # libx264 wrote other bytes in about half of all processes (threads, macroblock-tree rate control) and the WebM
    # muxer random ids: every invocation of the benchmark trained on other data.
    script = (
        "import sys; from crosstvr.synthetic import render_scene, scene_groups, write_benchmark, write_video\n"
        "write_benchmark(sys.argv[1], seed=0, groups=(2, 1, 1))\n"
        "for extension in ('avi', 'webm'):\n"
        "    write_video(f'{sys.argv[1]}/videos/extra.{extension}', render_scene(scene_groups(1, 0)[0]['base'], 8))\n"
    )
    digests = []
    for run in range(3):
        folder = tmp_path / str(run)
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True, cwd=ROOT)
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        assert len(files) > 16 * 1 + 12 * 12  # the videos and the decoded frames of train and val
        digests.append({path.relative_to(folder): path.read_bytes() for path in files})
    for other in digests[1:]:
        assert other.keys() == digests[0].keys()
        assert [str(path) for path, content in other.items() if content != digests[0][path]] == []


def _load_benchmark(name: str = "synthetic_benchmark"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_recipe_writes_the_paper_shaped_report_reproducibly(tmp_path, capsys, monkeypatch):
    benchmark = _load_benchmark()
    threads = torch.get_num_threads()
    command = ["--smoke", "--seeds", "0", "1", "--ablations", "--systems", "--threads", "1"]
    assert benchmark.main([*command, "--output", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["torch_threads"] == 1
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # The same command again, in a fresh interpreter with another hash seed, another folder and another default thread
    # count, gives the same weights bit for bit and the same table. (Without --threads the weights differ in the last
    # bits between thread counts: matrix products split their sums by thread.)
    again = tmp_path / "again"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "synthetic_benchmark.py"), *command, "--output",
                    str(again)], check=True, capture_output=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "2"})
    assert json.loads((again / "results.json").read_text())["summary"] == report["summary"]
    for model in ("stage1", "shared", "separate", "t2v2t", "ts2net_similarity-stage1"):
        for seed in (0, 1):
            path = os.path.join(f"seed-{seed}", model, "final", "model.safetensors")
            assert (again / path).read_bytes() == (tmp_path / path).read_bytes(), path
    table = report["summary"]["table"]
    assert set(table) == {"stage1", "spatial", "temporal", "shared", "separate", "t2v2t", "naive_t2v2t",
                          "t2v2t_differences", "stage1_ts2net_similarity", "shared_on_ts2net_similarity",
                          "stage1_cret", "shared_on_cret"}
    for row in table.values():
        mean, std = row["t2v_R1"]
        assert 0 <= mean <= 100 and std >= 0
    assert [int(depth) for depth in report["summary"]["depths"]] == list(range(2, 20))
    assert set(report["per_seed"]) == {"0", "1"}
    assert set(report["summary"]["val_ablations"]) == set(benchmark.ABLATIONS)
    assert set(report["summary"]["val_fusion"]) == {"probability", "log_probability", "logit"}
    markdown = (tmp_path / "results.md").read_text()
    assert "+ spatial & temporal, shared (CrossTVR)" in markdown and "| 19 |" in markdown
    assert "| + T2V2T fusion (bypass) |" in markdown and "| + naive T2V2T (no bypass) |" in markdown
    assert "| Stage 1 with TS2-Net's text-conditioned frame similarity |" in markdown
    assert "| Stage 1 with CRET's similarity (CCM + GEES) |" in markdown
    assert "validation split" in markdown and "in_batch_negatives_only" in markdown
    assert (tmp_path / "depth_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"benchmark": "synthetic"' in capsys.readouterr().out
    # Shipping a finished run installs the full model of the seed that gains most on validation, evaluated on test.
    gains = {int(seed): r["val"]["shared"]["t2v_R1"] - r["val"]["stage1"]["t2v_R1"]
             for seed, r in report["per_seed"].items()}
    chosen = max(sorted(gains), key=gains.get)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(crosstvr.default_model, "DEFAULT_CHECKPOINT", str(shipped))
    with pytest.raises(SystemExit, match="pass its --budget"):
        benchmark.main(["--ship-from", str(tmp_path)])
    assert not shipped.exists()
    assert benchmark.main(["--smoke", "--ship-from", str(tmp_path)]) == 0
    assert f"embedded default (seed {chosen})" in capsys.readouterr().out
    assert (shipped / "model.safetensors").read_bytes() == (
        tmp_path / f"seed-{chosen}" / "shared" / "final" / "model.safetensors").read_bytes()
    assert not list(shipped.glob("*.py"))
    card = (shipped / "README.md").read_text()
    assert f"--smoke --ship-default` (seed {chosen}" in card and "changes text-to-video R@1" in card
    assert json.loads((shipped / "evaluation_synthetic_test.json").read_text())["split"] == "test"
    # The diagnostics read the same run.
    assert _load_benchmark("synthetic_diagnostics").main(["--output", str(tmp_path), "--seed", "1"]) == 0
    diagnostics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(diagnostics["stage2_within_group_accuracy"]) == {"base", "dot_colour", "direction", "order"}
    assert all(0 <= value <= 1 for value in diagnostics["stage1_within_group_accuracy"].values())
    assert 1 / diagnostics["selection_candidates"] <= diagnostics["selection_slot_weight"] <= 1
    change = diagnostics["fine_module_change_vs_other_group"]  # the smoke recipe's shared CrossTVR module
    assert set(change) == {"spatial", "fused", "logits"}
    assert all(set(ratios) == {"dot_colour", "direction", "order"} and min(ratios.values()) >= 0
               for ratios in change.values())
    by_axis = diagnostics["direction_within_group_accuracy_by_axis"]
    assert by_axis["stage2"] and set(by_axis["stage2"]) == set(by_axis["stage1"]) <= {"horizontal", "vertical"}
    assert all(0 <= value <= 1 for values in by_axis.values() for value in values.values())
    diagnose = _load_benchmark("synthetic_diagnostics").main
    assert diagnose(["--output", str(tmp_path), "--pretrained", "--split", "val"]) == 0
    probed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(probed["tower"]) == set(probed["blip2"]) == {"dot_colour", "direction", "order"}
    probe = probed["dot_colour_linear_probe"]
    assert probe["frames"] == 4 * 4 and 0 <= probe["dot_patch_token"] <= 1 and 0 <= probe["pooled_embedding"] <= 1
    # Run again in the same folder (as after a kill), with stage 2's steps changed: every finished step whose setting,
    # inputs and code are unchanged is reused, the others run again.
    outputs = {name: tmp_path / path / "model.safetensors" for name, path in
               {"clip": "pretrained/clip", "stage1": "seed-1/stage1/final", "shared": "seed-1/shared/final"}.items()}
    stamps = {name: path.stat().st_mtime_ns for name, path in outputs.items()}
    monkeypatch.setitem(benchmark.SETTINGS["smoke"], "stage2_steps", benchmark.SETTINGS["smoke"]["stage2_steps"] + 1)
    assert benchmark.main(["--smoke", "--output", str(tmp_path), "--seeds", "1", "--threads", "1"]) == 0
    changed = {name for name, path in outputs.items() if path.stat().st_mtime_ns != stamps[name]}
    assert changed == {"shared"}
    # At another thread count the weights differ in their last bits, so every step runs again (and stage 2 with a
    # token cache of the new stage 1).
    assert benchmark.main(["--smoke", "--output", str(tmp_path), "--seeds", "1", "--threads", "2"]) == 0
    assert {name for name, path in outputs.items() if path.stat().st_mtime_ns != stamps[name]} == set(outputs)
    assert _load_benchmark("synthetic_diagnostics").main(["--output", str(tmp_path), "--model", "t2v2t"]) == 0
    output = capsys.readouterr().out
    assert "seed 0, t2v2t" in output and "selection_slot_weight" not in output  # T2V2T selects no tokens
    assert json.loads(output.strip().splitlines()[-1])["fine_module_change_vs_other_group"] == {}  # no decoupled passes
    with pytest.raises(SystemExit, match="no trained model"):
        _load_benchmark("synthetic_diagnostics").main(["--output", str(tmp_path), "--model", "nope"])


def test_selection_sharpness_tells_a_flat_selector_from_a_peaked_one():
    from crosstvr.default_model import build_tiny_model

    sharpness = _load_benchmark("synthetic_diagnostics").selection_sharpness
    model, _ = build_tiny_model()
    selector = model.fine_module.token_selector
    tokens = torch.randn(3, model.config.num_frames, 10, model.config.fine_vision_hidden_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        selector.fc2.weight.zero_()  # every token scores the same: each slot averages many tokens in training
        flat = sharpness(model, tokens)
        selector.fc2.weight.normal_(0, 100.0, generator=torch.Generator().manual_seed(1))  # far apart: one token a slot
        peaked = sharpness(model, tokens)
    assert flat["selection_log_p_range"] == 0 and flat["selection_slot_weight"] < 0.5
    assert peaked["selection_slot_weight"] > 0.9 and peaked["selection_candidates"] == 10


def test_embedded_default_loads_with_remote_code_and_retrieves(tmp_path):
    from crosstvr import CrossTVRModel, CrossTVRProcessor
    from crosstvr.default_model import DEFAULT_CHECKPOINT, load_default_model

    # The package's code files are their only source: the shipped folder holds weights and configuration, and saving
    # it writes the current code beside them.
    assert not any(name.endswith(".py") for name in os.listdir(DEFAULT_CHECKPOINT))
    saved = tmp_path / "saved"
    for part in load_default_model():
        part.save_pretrained(saved)
    for name in ("configuration_crosstvr.py", "modeling_crosstvr.py", "processing_crosstvr.py"):
        with open(os.path.join(ROOT, "crosstvr", name), "rb") as source, open(saved / name, "rb") as copy:
            assert source.read() == copy.read()
    # A fresh interpreter that imports only transformers: the saved copy of the code is what loads.
    code = (
        "import sys; from transformers import AutoModel, AutoProcessor; "
        f"model = AutoModel.from_pretrained({str(saved)!r}, trust_remote_code=True); "
        f"AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True); "
        "print(type(model).__name__, type(model).__module__, 'crosstvr' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.split()
    assert output[0] == "CrossTVRModel" and output[1].startswith("transformers_modules.") and output[2] == "False"
    model = CrossTVRModel.from_pretrained(DEFAULT_CHECKPOINT).eval()
    processor = CrossTVRProcessor.from_pretrained(DEFAULT_CHECKPOINT)
    # Scenes the model has not seen (another seed), 4 groups of near-duplicates.
    captions = write_sample_library(tmp_path / "videos", count=16, seed=77)
    names = sorted(captions)
    with torch.no_grad():
        videos = processor(videos=[str(tmp_path / "videos" / name) for name in names])
        texts = processor(text=[captions[name] for name in names])
        output = model.retrieve(**texts, **videos)
    ranking = output.text_to_video.ranking
    hits = sum(int(ranking[query, 0]) == query for query in range(16))
    in_top4 = sum(query in ranking[query, :4].tolist() for query in range(16))
    # Chance is 1 hit in 16 queries (and 4 of 16 in the top 4); the model finds each query's group of near-duplicates
    # and, within it, its own video more often than a guess would.
    assert hits >= 3 and in_top4 >= 12, ranking[:, :4]


def test_a_step_computed_with_another_instruction_set_is_not_reused(tmp_path, monkeypatch):
    # torch's AVX2 and AVX-512 kernels add in other orders, so a step's weights depend on the CPU's kernels: a run
    # resumed on another machine must train the step again rather than mix numerics.
    benchmark = _load_benchmark()
    inputs = [str(tmp_path)]
    here = benchmark._step_fingerprint({"steps": 1}, inputs)
    assert benchmark._step_fingerprint({"steps": 1}, inputs) == here
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert benchmark._step_fingerprint({"steps": 1}, inputs) != here
