"""The `crosstvr` command line."""

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict

from .search import encode_videos, find_videos, load_model, search_videos


def _print_table(result, limit: int, root: str) -> None:
    print(f'\nquery: "{result.query}"')
    print(f"{'rank':>4}  {'score':>8}  {'stage-1':>8}  video")
    for hit in result.hits[:limit]:
        marker = "*" if hit.reranked else " "
        print(f"{hit.rank:>4}  {hit.score:>8.4f}  {hit.coarse_score:>8.4f}{marker} {os.path.relpath(hit.path, root)}")


def demo(args: argparse.Namespace) -> int:
    model, processor = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="crosstvr-samples-") as samples:
        if args.videos is None:
            from .synthetic import write_sample_library

            captions = write_sample_library(samples, count=args.num_samples)
            video_dir = samples
            queries = args.query or list(captions.values())[:3]
        else:
            video_dir = args.videos
            queries = args.query or ["a red circle moves left"]
        paths = find_videos(video_dir)
        if not paths:
            print(f"error: no video files (mp4, avi, mkv, webm, mov) under {video_dir}", file=sys.stderr)
            return 1
        videos = encode_videos(model, processor, paths)
        results = [search_videos(model, processor, videos, query, args.top_k_rerank) for query in queries]
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "skipped": videos.skipped}, indent=2))
    else:
        for result in results:
            _print_table(result, args.k, video_dir)
        print("\n* re-ranked by stage 2 (score = stage-1 + w * stage-2); the others keep their stage-1 order.")
        if args.model is None:
            print("Model: the embedded default (tiny, untrained until the synthetic benchmark ships a checkpoint).")
        for path, reason in videos.skipped.items():
            print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosstvr", description="CrossTVR two-stage text-video retrieval.")
    commands = parser.add_subparsers(dest="command", required=True)
    parser_demo = commands.add_parser(
        "demo",
        help="search a folder of videos by text (generated sample videos by default)",
        description="Encode a folder of videos and answer text queries with a ranked list. Without --videos, sample "
        "videos are generated; without --model, the embedded default model is used (no download).",
    )
    parser_demo.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded default)")
    parser_demo.add_argument("--videos", help="folder of videos, searched recursively (default: generated samples)")
    parser_demo.add_argument("--query", action="append", help="text query; repeat for several (default: samples)")
    parser_demo.add_argument("-k", type=int, default=10, help="results to print per query (default: 10)")
    parser_demo.add_argument("--top-k-rerank", type=int, help="re-ranking depth K (default: the model's)")
    parser_demo.add_argument("--num-samples", type=int, default=8, help="sample videos to generate (default: 8)")
    parser_demo.add_argument("--json", action="store_true", help="print results as JSON")
    parser_demo.set_defaults(handler=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)
