"""The performance benchmark script runs end to end (tiny geometry, quick sizes); its numbers are not asserted."""

import importlib.util
import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_performance_benchmark_prints_its_table_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_performance",
                                                  os.path.join(ROOT, "benchmarks", "bench_performance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sections = ["encode", "rerank", "decode", "index", "search", "train", "catalog", "ivfpq", "tokens", "frames"]
    argv = ["--geometry", "tiny", "--quick", "--device", "cpu", "--workdir", str(tmp_path), "--sections", *sections]
    assert module.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| section |")
    report = json.loads(lines[-1])
    assert set(sections) <= set(report)
    assert report["rerank"]["speedup_over_loop"] > 0 and report["encode"]["gflop_per_video"] > 0
    assert 0 <= report["search"]["10000"]["ivf128_recall_at_15"] <= 1
    assert 0 < report["frames"]["2000"]["ivf_frames_recall_at_15"] <= 1 and report["frames"]["2000"]["ivf_nlist"] > 0
    assert report["ivfpq"]["kind"] == "ivfpq" and 0 <= report["ivfpq"]["recall_at_15"] <= 1
    assert report["catalog"]["10000 bytes_written_per_video"] > 0 and report["catalog"]["10000 open_and_first_lookup_ms"] > 0
    tokens = report["tokens"]
    assert tokens["none bytes_per_video"] == 0 < tokens["int8 bytes_per_video"] < tokens["float16 bytes_per_video"]
    assert 0 <= tokens["int8 synthetic_t2v_R1"] <= 100 and tokens["none ms_per_query"] > 0


def test_performance_benchmark_measures_t2v2t_as_stage_two(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_performance",
                                                  os.path.join(ROOT, "benchmarks", "bench_performance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--geometry", "tiny", "--quick", "--device", "cpu", "--workdir", str(tmp_path), "--sections", "rerank",
            "train", "--fine-module", "t2v2t"]
    assert module.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["fine_module"] == "t2v2t" and report["rerank"]["gflop_per_query"] > 0
