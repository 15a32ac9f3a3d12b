"""How fast the benchmark loaders read full-size annotation sets (issue: MSR-VTT's 180k training captions must load
in seconds, into memory-mapped Arrow).

Writes an MSR-VTT-sized annotation set (10,000 videos x 20 captions; train_9k, train_7k, test_1k) with empty
placeholder video files, then times the first load (parse + match videos + write the Arrow cache) and a cached load.
Prints a table and one JSON line.

    python benchmarks/bench_dataset_loading.py [--workdir DIR]
"""

import argparse
import csv
import json
import os
import resource
import tempfile
import time

from crosstvr.data import load_msrvtt


def write_msrvtt_annotations(root: str, num_videos: int = 10_000, captions_per_video: int = 20) -> tuple[str, str]:
    annotations, videos = os.path.join(root, "annotations"), os.path.join(root, "videos")
    os.makedirs(annotations, exist_ok=True)
    os.makedirs(videos, exist_ok=True)
    video_ids = [f"video{i}" for i in range(num_videos)]
    sentences = [
        {"caption": f"a person does thing number {k} in clip {i}", "video_id": v, "sen_id": i * captions_per_video + k}
        for i, v in enumerate(video_ids)
        for k in range(captions_per_video)
    ]
    with open(os.path.join(annotations, "MSRVTT_data.json"), "w") as file:
        json.dump({"videos": [{"video_id": v} for v in video_ids], "sentences": sentences}, file)
    for name, ids in (("MSRVTT_train.9k.csv", video_ids[:9000]), ("MSRVTT_train.7k.csv", video_ids[:7000])):
        with open(os.path.join(annotations, name), "w", newline="") as file:
            csv.writer(file).writerows([["video_id"], *([v] for v in ids)])
    with open(os.path.join(annotations, "MSRVTT_JSFUSION_test.csv"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        writer.writerows([f"ret{k}", f"msr{9000 + k}", f"video{9000 + k}", "a test caption"] for k in range(1000))
    for v in video_ids:
        open(os.path.join(videos, f"{v}.mp4"), "wb").close()
    return annotations, videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write the annotation set (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or scratch
        annotations, videos = write_msrvtt_annotations(root)
        cache = os.path.join(root, "cache")
        start = time.perf_counter()
        first = load_msrvtt(annotations, videos, cache_dir=cache)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        cached = load_msrvtt(annotations, videos, cache_dir=cache)
        cached_seconds = time.perf_counter() - start
        rows = {split: dataset.num_rows for split, dataset in cached.items()}
        memory_mapped = all(dataset.cache_files for dataset in cached.values())
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert first["train_9k"].num_rows == 180_000
    print(f"{'step':<28}{'seconds':>10}")
    print(f"{'first load (parse + cache)':<28}{first_seconds:>10.2f}")
    print(f"{'cached load':<28}{cached_seconds:>10.2f}")
    print(f"rows: {rows}; memory-mapped Arrow: {memory_mapped}; peak RSS {peak_rss_mb:.0f} MB")
    print(json.dumps({"benchmark": "dataset_loading", "dataset": "msrvtt", "rows": rows, "first_load_s": round(first_seconds, 3),
                      "cached_load_s": round(cached_seconds, 3), "memory_mapped": memory_mapped, "peak_rss_mb": round(peak_rss_mb)}))


if __name__ == "__main__":
    main()
