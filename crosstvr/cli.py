"""The `crosstvr` command line."""

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict

from .search import encode_videos, find_videos, load_model, search_videos


# The benchmark names, without importing `datasets` for `--help`.
FORMATS_FOR_CLI = ("didemo", "lsmdc", "msrvtt", "msvd", "vatex")


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


def evaluate(args: argparse.Namespace) -> int:
    from . import __version__
    from .data import FORMATS, load_retrieval_dataset
    from .evaluation import evaluate_retrieval
    from .evaluation.report import format_table, write_results

    dataset_format = FORMATS[args.dataset]
    split = args.split or dataset_format.splits[-1]
    bank_split = args.qb_norm_split or dataset_format.splits[0]
    splits = [split] + ([bank_split] if args.qb_norm and bank_split != split else [])
    dataset = load_retrieval_dataset(
        args.dataset,
        args.annotations,
        args.videos,
        splits=splits,
        on_bad_video=args.on_bad_video,
        check_videos=args.check_videos,
        cache_dir=args.cache_dir,
    )
    querybank = None
    if args.qb_norm:
        captions = dataset[bank_split]["caption"]
        querybank = captions[: args.qb_norm_size] if args.qb_norm_size else captions
    model, processor = load_model(args.model)
    evaluation = evaluate_retrieval(
        model,
        processor,
        dataset[split],
        rerank=not args.no_rerank,
        top_k=args.top_k,
        fine_score_weight=args.fine_score_weight,
        post_processing="dsl" if args.dsl else "qb_norm" if args.qb_norm else None,
        querybank_captions=querybank,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    output = args.output or f"evaluation_{args.dataset}_{split}.json"
    write_results(
        output,
        evaluation,
        model=args.model or "embedded default",
        dataset=args.dataset,
        split=split,
        crosstvr_version=__version__,
    )
    print(f"{dataset_format.name} {split}")
    print(format_table(evaluation))
    print(f"results written to {output}")
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

    parser_evaluate = commands.add_parser(
        "evaluate",
        help="evaluate retrieval on a benchmark split (R@1/5/10, MdR, MnR, both directions)",
        description="Evaluate stage 1 and the two-stage model on a benchmark stored in its official layout; prints "
        "the paper-style table and writes the results as JSON.",
    )
    parser_evaluate.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded default)")
    parser_evaluate.add_argument("--dataset", required=True, choices=sorted(FORMATS_FOR_CLI))
    parser_evaluate.add_argument("--annotations", required=True, help="folder with the annotation files")
    parser_evaluate.add_argument("--videos", required=True, help="folder with the videos (searched recursively)")
    parser_evaluate.add_argument("--split", help="split to evaluate (default: test_1k for msrvtt, test otherwise)")
    parser_evaluate.add_argument("--top-k", type=int, help="re-ranking depth K (default: the model's, 15)")
    parser_evaluate.add_argument("--fine-score-weight", type=float, help="w in s_coarse + w * s_fine")
    parser_evaluate.add_argument("--no-rerank", action="store_true", help="evaluate stage 1 only")
    post = parser_evaluate.add_mutually_exclusive_group()
    post.add_argument("--dsl", action="store_true", help="dual softmax on the stage-1 similarity")
    post.add_argument("--qb-norm", action="store_true", help="querybank normalisation with training captions")
    parser_evaluate.add_argument("--qb-norm-split", help="split whose captions form the query bank (default: train)")
    parser_evaluate.add_argument("--qb-norm-size", type=int, help="use the first N captions of the bank split")
    parser_evaluate.add_argument("--batch-size", type=int, default=16, help="videos per encoding batch")
    parser_evaluate.add_argument("--num-workers", type=int, default=2, help="video decoding processes")
    parser_evaluate.add_argument("--on-bad-video", choices=("error", "skip"), default="error")
    parser_evaluate.add_argument("--check-videos", action="store_true", help="decode-check every video first")
    parser_evaluate.add_argument("--cache-dir", help="Arrow cache of the dataset (default: HF datasets cache)")
    parser_evaluate.add_argument("--output", help="results JSON (default: evaluation_<dataset>_<split>.json)")
    parser_evaluate.set_defaults(handler=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)
