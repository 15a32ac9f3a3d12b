"""The `crosstvr` command line: index and search a video library, run the demo, evaluate on a benchmark."""

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict

from .loading import DTYPES, load_model, resolve_device
from .video_store import TOKEN_STORAGES


# The benchmark names, without importing `datasets` for `--help`.
FORMATS_FOR_CLI = ("didemo", "lsmdc", "msrvtt", "msvd", "vatex")


def _print_table(result, root: str | None = None) -> None:
    print(f'\nquery: "{result.query}"')
    print(f"{'rank':>4}  {'score':>8}  {'stage-1':>8}  video")
    for hit in result.hits:
        marker = "*" if hit.reranked else " "
        path = os.path.relpath(hit.path, root) if root else hit.path
        print(f"{hit.rank:>4}  {hit.score:>8.4f}  {hit.coarse_score:>8.4f}{marker} {path}")


def _report_update(update: dict, index) -> None:
    print(
        f"indexed {update['total']} videos in {index.index_dir} ({update['added']} added, "
        f"{update['updated']} re-encoded, {update['removed']} removed)"
    )
    for path, reason in update["skipped"].items():
        print(f"skipped {path}: {reason}", file=sys.stderr)


def index(args: argparse.Namespace) -> int:
    import torch

    from .indexing import IndexMismatchError, VideoIndex

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.decoding:
        processor.decoding = args.decoding
    try:
        video_index = VideoIndex.build(
            args.video_dir,
            args.index,
            model,
            processor,
            model_name=args.model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            chunk_size=args.chunk_size,
            faiss_index=None if args.faiss == "none" else args.faiss,
            token_storage=args.token_storage,
        )
    except IndexMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun, leaving with the process group alive lets gloo's threads abort the process at exit
        # ("terminate called without an active exception"): tear it down while every rank is still here.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _report_update(video_index.last_update, video_index)
    if not len(video_index):
        print(f"error: nothing could be indexed under {args.video_dir}", file=sys.stderr)
        return 1
    return 0


def search(args: argparse.Namespace) -> int:
    from .indexing import VideoIndex, write_contact_sheet

    video_index = VideoIndex.open(args.index, device=args.device, model_name=args.model)
    try:
        result = video_index.search(args.query, k=args.k, top_k_rerank=args.top_k_rerank, rerank=not args.no_rerank,
                                    nprobe=args.nprobe, ef_search=args.ef_search)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        _print_table(result)
        print("\n* re-ranked by stage 2 (score = stage-1 + w * stage-2); the others keep their stage-1 order.")
    if args.contact_sheet:
        write_contact_sheet(result, args.contact_sheet)
        print(f"contact sheet written to {args.contact_sheet}", file=sys.stderr)
    return 0


def demo(args: argparse.Namespace) -> int:
    from .indexing import IndexMismatchError, VideoIndex, write_contact_sheet

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    video_dir = args.videos
    queries = args.query
    if video_dir is None:
        from .synthetic import write_sample_library

        video_dir = os.path.join(args.output, "videos")
        captions = write_sample_library(video_dir, count=args.num_samples)
        queries = queries or list(captions.values())[:3]
    queries = queries or ["a red circle moves left"]
    index_dir = os.path.join(args.output, "index")
    try:
        video_index = VideoIndex.build(video_dir, index_dir, model, processor, model_name=args.model)
    except IndexMismatchError as error:
        # The demo's own index from another model (an earlier run with another --model, or an upgraded default):
        # it is the demo's output, so it is rebuilt rather than refused.
        logging.getLogger(__name__).warning("%s; rebuilding the demo's index", error)
        shutil.rmtree(index_dir)
        video_index = VideoIndex.build(video_dir, index_dir, model, processor, model_name=args.model)
    if not args.json:
        _report_update(video_index.last_update, video_index)
    if not len(video_index):
        print(f"error: no video could be indexed under {video_dir}", file=sys.stderr)
        return 1
    results = [video_index.search(query, k=args.k, top_k_rerank=args.top_k_rerank) for query in queries]
    sheets = []
    for number, result in enumerate(results):
        sheets.append(os.path.join(args.output, f"contact_sheet_{number}.png"))
        write_contact_sheet(result, sheets[-1])
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "contact_sheets": sheets,
                          "skipped": video_index.last_update["skipped"]}, indent=2))
        return 0
    for result in results:
        _print_table(result, video_dir)
    print("\n* re-ranked by stage 2 (score = stage-1 + w * stage-2); the others keep their stage-1 order.")
    print(f"contact sheets: {', '.join(sheets)}")
    if args.model is None:
        print("model: the embedded default (see README: what it was trained on and how well it does).")
    return 0


def serve(args: argparse.Namespace) -> int:
    from .serve import LibraryService, serve as launch

    service = LibraryService(args.index, args.library, model_name=args.model, device=args.device)
    print(service.status(), file=sys.stderr)
    launch(service, host=args.host, port=args.port)
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
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
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


def _device(value: str) -> str:
    """`--device`: "auto", or a device that exists here (checked now, so that a typo fails before any work)."""
    if value != "auto":
        try:
            resolve_device(value)
        except (RuntimeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return value


def _add_model_placement(parser: argparse.ArgumentParser, dtype: bool) -> None:
    parser.add_argument("--device", type=_device, default="auto",
                        help="where the model runs: auto (the default: this process's GPU under accelerate launch or "
                        "torchrun, the GPU if there is one, else the CPU), cpu, cuda, cuda:N")
    if dtype:
        parser.add_argument("--dtype", choices=tuple(DTYPES),
                            help="precision of the towers (stage 2 stays float32); default: the checkpoint's. "
                            "bfloat16 or float16 on GPUs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosstvr", description="CrossTVR two-stage text-video retrieval.")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "checkpoint folder or Hub id (default: the embedded default)"

    parser_index = commands.add_parser(
        "index",
        help="index a folder of videos (resumable, incremental)",
        description="Encode every video under VIDEO_DIR (mp4, avi, mkv, webm, mov; recursively) into INDEX_DIR. "
        "Re-running adds new videos, re-encodes changed ones, drops deleted ones, and resumes an interrupted run. "
        "Unreadable files are skipped and listed; the exit status is 1 only if nothing could be indexed.",
    )
    parser_index.add_argument("video_dir")
    parser_index.add_argument("--index", required=True, help="the index folder")
    parser_index.add_argument("--model", help=model_help)
    parser_index.add_argument("--batch-size", type=int, default=8, help="videos per encoding batch")
    parser_index.add_argument("--num-workers", type=int, default=2, help="decoding processes")
    parser_index.add_argument("--chunk-size", type=int, default=256, help="videos per stored chunk")
    parser_index.add_argument("--decoding", choices=("exact", "reference_frames"),
                              help="exact sampled frames (decord), or the nearest reference frames, about twice as "
                              "fast (PyAV, skips non-reference frames); default: the processor's (exact)")
    parser_index.add_argument("--faiss", choices=("flat", "ivf", "hnsw", "ivfpq", "none"), default="flat",
                              help="stage-1 ANN index when faiss-cpu is installed (default: flat, exact; ivfpq: "
                              "at most 64 bytes a video in memory, for tens of millions of videos)")
    parser_index.add_argument("--token-storage", choices=TOKEN_STORAGES,
                              help="how the stage-2 tokens are kept, fixed when the index is created: float16 (the "
                              "default), int8 (half the disk, a scale per token), or none (0 bytes; each search "
                              "re-encodes the K videos it re-ranks from their files)")
    _add_model_placement(parser_index, dtype=True)  # the index records the precision; searches load it so
    parser_index.set_defaults(handler=index)

    parser_search = commands.add_parser("search", help="search an index by text",
                                        description="Stage-1 search of INDEX_DIR, then stage-2 re-ranking of the top K.")
    parser_search.add_argument("index", help="the index folder")
    parser_search.add_argument("query", help="the text query")
    parser_search.add_argument("-k", type=int, default=10, help="results to return (default: 10)")
    parser_search.add_argument("--top-k-rerank", type=int, help="re-ranking depth K (default: the model's)")
    parser_search.add_argument("--no-rerank", action="store_true", help="stage 1 only")
    parser_search.add_argument("--json", action="store_true", help="print the results as JSON")
    parser_search.add_argument("--contact-sheet", help="write a PNG with a few frames of every result")
    parser_search.add_argument("--model", help="the model (default: the one the index was built with)")
    parser_search.add_argument("--nprobe", type=int, help="IVF lists probed (ivf/ivfpq indexes; default: the index's)")
    parser_search.add_argument("--ef-search", type=int, help="HNSW search breadth (hnsw indexes; default: the index's)")
    _add_model_placement(parser_search, dtype=False)
    parser_search.set_defaults(handler=search)

    parser_demo = commands.add_parser(
        "demo",
        help="index generated sample videos (or --videos DIR) and search them",
        description="Generate sample videos (unless --videos), index them, answer a few queries with a ranked list "
        "and a contact sheet. Without --model it uses the embedded default model (no download).",
    )
    parser_demo.add_argument("--model", help=model_help)
    parser_demo.add_argument("--videos", help="folder of videos, searched recursively (default: generated samples)")
    parser_demo.add_argument("--output", default="crosstvr-demo", help="samples, index and contact sheets go here")
    parser_demo.add_argument("--query", action="append", help="text query; repeat for several (default: samples)")
    parser_demo.add_argument("-k", type=int, default=5, help="results per query (default: 5)")
    parser_demo.add_argument("--top-k-rerank", type=int, help="re-ranking depth K (default: the model's)")
    parser_demo.add_argument("--num-samples", type=int, default=12, help="sample videos to generate (default: 12)")
    parser_demo.add_argument("--json", action="store_true", help="print results as JSON")
    _add_model_placement(parser_demo, dtype=True)
    parser_demo.set_defaults(handler=demo)

    parser_serve = commands.add_parser(
        "serve",
        help="a search page for an index in the browser (needs: pip install -e '.[app]')",
        description="Serve a Gradio search page for INDEX_DIR: a query box, the hits as thumbnails in stage 1's and "
        "the re-ranked order, a player, and an action that indexes new videos of the library in the background. "
        "Listens on 127.0.0.1 unless --host says otherwise; only videos of the library are ever served.",
    )
    parser_serve.add_argument("index", help="the index folder (built by `crosstvr index`, or from the page)")
    parser_serve.add_argument("--library", help="the video folder it indexes (default: the folder of its videos)")
    parser_serve.add_argument("--model", help="the model (default: the one the index was built with)")
    parser_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser_serve.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    _add_model_placement(parser_serve, dtype=False)
    parser_serve.set_defaults(handler=serve)

    parser_evaluate = commands.add_parser(
        "evaluate",
        help="evaluate retrieval on a benchmark split (R@1/5/10, MdR, MnR, both directions)",
        description="Evaluate stage 1 and the two-stage model on a benchmark stored in its official layout; prints "
        "the paper-style table and writes the results as JSON.",
    )
    parser_evaluate.add_argument("--model", help=model_help)
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
    _add_model_placement(parser_evaluate, dtype=True)
    parser_evaluate.set_defaults(handler=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args)
