"""Speed and memory of every stage of the pipeline, against the machine's limit and the peer approach.

    python benchmarks/bench_performance.py [--sections limit encode rerank decode index search train memory catalog ivfpq
                                            tokens frames]
                                           [--geometry base|tiny] [--device cpu|cuda] [--dtype float32|bfloat16]
                                           [--quick]
                                           [--fine-module crosstvr|t2v2t]

Measured at the paper's Base geometry (ViT-B/32 at 224 px, 12 frames of 50 tokens, a BLIP-2-size Q-Former: 12 layers,
width 768, cross-attention every 2nd layer, 32 queries + 32 text tokens), with random weights: timing does not depend
on them. `--geometry tiny` runs the same code on the embedded default's toy geometry (the test suite's smoke run).
`--fine-module t2v2t` measures T2V2T fusion as stage 2 instead of CrossTVR's decoupled attention (rerank and train).

Sections (each prints its rows; the end prints the table and one JSON line):

- limit:  fp32 matrix-multiply throughput (GFLOP/s), the yardstick for the rest. Every ratio to it is measured
          interleaved: the limit is taken again right before and after each timed run of encoding and re-ranking
          (the higher of the two counts), and each ratio is printed as the median over the repeats (at least 3) with
          its minimum and maximum (`_min`, `_max`), so that it does not depend on when the limit was measured.
- encode: stage-1 + stage-2 video encoding, frames/s and counted FLOPs as a fraction of the limit.
- rerank: stage 2 for one query at K = 15, batched (all K x T spatial sequences in one call) against a naive loop
          of one call per pair; its FLOP efficiency; and its cost as a fraction of encoding the 1,000 videos searched,
          for a text of the full 32 tokens and for a 16-token caption padded to 32.
- decode: our sampler (12 uniformly spaced frames; decoding="exact" with decord, and "reference_frames", which skips
          non-reference frames and jumps to keyframes) against the CLIP4Clip way (OpenCV decodes every frame, keeps one
          per second, subsamples) on generated 30 s H.264 videos with 250-frame keyframe intervals; the three readers
          take turns in each repeat, and the speed-ups are medians of per-repeat ratios with their spread.
- index:  `VideoIndex.build` end to end (decode + preprocess + encode + write) against encoding alone.
- search: stage-1 search, ms per query, exact (one matrix product) against FAISS IVF, with recall of the exact top 15,
          over 10k / 100k / 1M clustered embeddings.
- train:  stage-2 training steps/s from the token cache against from pixels.
- memory: peak RSS of indexing N and 2N videos (flat when streaming) and of a search; token-cache bytes per video.
- catalog: indexing's bookkeeping at 10k / 100k / 1M simulated videos, each in a fresh process: `VideoIndex.add` of
          the tiny model over a simulated library (the folder walk yields made-up paths and stats, the encoder is
          stubbed to zero embeddings and no tokens; everything else - listing, plan, chunks of 256 written and
          recorded, positions numbered - runs as in a real build); peak RSS above the process with the model loaded,
          bytes written (write system calls: catalog, chunk files) per video, and opening the catalog in another
          fresh process and looking up a query's 15 hits.
- tokens: the index's stage-2 token storage (`crosstvr index --token-storage`): float16, int8 (a scale per token) and
          none (no tokens; a search re-encodes its K candidates from their files). Bytes of tokens per video on disk and
          ms per query at K = 15 (an index of 16 clips at the chosen geometry); and T2V R@1 of search with the embedded
          default (stage 1 + re-ranking at its K) on a synthetic test split of 200 videos the recipe never used
          (`write_benchmark(seed=2026, groups=(1, 1, 50))`, the set of the README's check of the default), with the
          change from float16 (target: at most 0.2 points for int8).
- frames: stage-1 search with TS2-Net's frame-level head (`similarity_head="text_conditioned"`) at 10k / 100k videos
          of 12 frame embeddings each (scattered around a clustered video embedding): exact (the head over every
          frame) against an IVF index of the frames (128 lists probed) searched with `crosstvr.indexing.search_frames`
          (fetch frames until no unseen video can win), ms per query and recall of the exact top 15.
- ivfpq:  `crosstvr index --faiss ivfpq` at 2M clustered embeddings: bytes per video in memory, and per query the
          PQ shortlist re-scored with the exact embeddings as search does (from a memory-mapped float32 file, just
          written: in the page cache), ms and recall of the exact top 15.
"""

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = (
    "limit", "encode", "rerank", "decode", "index", "search", "train", "memory", "catalog", "ivfpq", "tokens", "frames"
)
FRAMES_PER_VIDEO = 12
TOP_K = 15
# Re-ranking is measured with texts of the processor's full length (32 tokens, the geometry) and with a caption
# of this many real tokens padded to that length (a 10-word caption is about 14 WordPiece tokens with [CLS]/[SEP]).
SHORT_CAPTION_TOKENS = 16
# Videos per index chunk in the memory section: both library sizes span several chunks, so a peak that does not grow
# with the library shows that indexing streams (it holds one chunk's tokens, about 0.9 MB a video at Base geometry).
MEMORY_CHUNK_SIZE = 4
NPROBES = (8, 32, 128)  # IVF lists probed per query (the index default is 128)
LIMIT_REPEATS = 5  # matrix products per limit measurement taken around each timed run (the best counts)


def build_model(geometry: str, device: str, fine_module: str = "crosstvr", dtype: torch.dtype = torch.float32):
    """A random CrossTVR of the given geometry and fine module (eval mode) and its processor; with a half-precision
    `dtype` loaded as a user loads a checkpoint (`from_pretrained(..., dtype=...)`: half-precision towers, float32
    stage 2)."""
    from crosstvr import CrossTVRConfig, CrossTVRModel, CrossTVRProcessor
    from crosstvr.default_model import build_tiny_model, build_tiny_processor

    if geometry == "tiny":
        model, processor = build_tiny_model(seed=0, fine_module=fine_module)
    else:
        from transformers import CLIPImageProcessorPil

        torch.manual_seed(0)
        # The defaults are the paper's Base geometry.
        model = CrossTVRModel(CrossTVRConfig(fine_module=fine_module)).eval()
        tiny = build_tiny_processor()  # its tokenizers: token ids are random here, only lengths matter
        processor = CrossTVRProcessor(
            CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
            tiny.tokenizer,
            tiny.qformer_tokenizer,
            num_frames=model.config.num_frames,
            max_text_length=32,
        )
    if dtype != torch.float32:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = CrossTVRModel.from_pretrained(folder, dtype=dtype).eval()
    return model.to(device), processor


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `function()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved_with_limit(
    function, device: str, repeats: int, dtype: torch.dtype = torch.float32
) -> tuple[list[float], list[float]]:
    """Seconds of each of `repeats` runs of `function()` (after one warm-up run), each run between two measurements
    of the matrix-product limit; returns the seconds and, per run, the higher of its two limits (GFLOP/s). A ratio to
    the limit then compares what ran within seconds of each other, not a limit taken minutes before."""
    function()
    _sync(device)
    seconds, limits = [], []
    for _ in range(repeats):
        before = matmul_limit(device, LIMIT_REPEATS, dtype)
        start = time.perf_counter()
        function()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        limits.append(max(before, matmul_limit(device, LIMIT_REPEATS, dtype)))
    return seconds, limits


def with_spread(name: str, values: list[float]) -> dict:
    """`name` = the median of `values`, with their minimum and maximum as `name_min`, `name_max`."""
    return {name: float(np.median(values)), f"{name}_min": min(values), f"{name}_max": max(values)}


def counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def matmul_limit(device: str, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of square matrix products in `dtype` (the towers' precision), the machine's practical limit for these
    models: the best of `repeats` runs (a limit; on a shared machine the median would understate it)."""
    size = 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = min(timed(lambda: a @ b, device, 1, warmup=0) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def random_text(processor, model, count: int, device: str) -> dict:
    """Q-Former and CLIP token ids of `count` texts at the processor's full length."""
    length = processor.max_text_length
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.text_config.vocab_size, model.config.qformer_config.vocab_size)
    ids = torch.randint(5, vocab, (count, length), generator=generator)
    ones = torch.ones(count, length, dtype=torch.long)
    return {
        "input_ids": ids.to(device), "attention_mask": ones.to(device),
        "qformer_input_ids": ids.to(device), "qformer_attention_mask": ones.to(device),
    }


def pixels(model, count: int, device: str) -> torch.Tensor:
    vision = model.config.vision_config
    size = (count, model.config.num_frames, 3, vision.image_size, vision.image_size)
    return torch.randn(size, generator=torch.Generator().manual_seed(1)).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


def bench_encode(model, device: str, repeats: int) -> dict:
    batch = 2
    pixel_values = pixels(model, batch, device)
    with torch.no_grad():
        flops = counted_flops(lambda: model.encode_video(pixel_values[:1]))
        runs, limits = interleaved_with_limit(lambda: model.encode_video(pixel_values), device, repeats, model.dtype)
    videos_per_s = batch / float(np.median(runs))
    return {
        "frames_per_s": videos_per_s * model.config.num_frames,
        "videos_per_s": videos_per_s,
        "gflop_per_video": flops / 1e9,
        **with_spread("fraction_of_limit", [flops * batch / s / 1e9 / limit for s, limit in zip(runs, limits)]),
    }


def bench_rerank(model, processor, device: str, encode: dict, repeats: int) -> dict:
    config = model.config
    tokens_per_frame = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    generator = torch.Generator().manual_seed(2)
    vision_tokens = torch.randn(TOP_K, config.num_frames, tokens_per_frame, config.vision_config.hidden_size,
                                generator=generator).to(device)
    text = random_text(processor, model, 1, device)
    similarity = torch.rand(1, TOP_K, generator=generator).to(device)
    args = (similarity, text["qformer_input_ids"], text["qformer_attention_mask"], vision_tokens)

    def batched():
        return model.rerank_text_to_video(*args, top_k=TOP_K, batch_size=TOP_K)

    def per_pair():
        return model.rerank_text_to_video(*args, top_k=TOP_K, batch_size=1)

    # A caption of SHORT_CAPTION_TOKENS real tokens, padded by the processor to its full length as in real use.
    short_mask = text["qformer_attention_mask"].clone()
    short_mask[:, SHORT_CAPTION_TOKENS:] = 0

    def short_caption():
        return model.rerank_text_to_video(similarity, text["qformer_input_ids"], short_mask, vision_tokens,
                                          top_k=TOP_K, batch_size=TOP_K)

    flops = counted_flops(batched)
    runs, limits = interleaved_with_limit(batched, device, repeats)  # stage 2 runs in float32 under any dtype
    seconds = float(np.median(runs))
    loop_seconds = timed(per_pair, device, max(1, repeats // 2))
    short_seconds = timed(short_caption, device, repeats)
    encoding_1000_videos = 1000 / encode["videos_per_s"]
    result = {
        "ms_per_query": seconds * 1e3,
        "per_pair_loop_ms": loop_seconds * 1e3,
        "speedup_over_loop": loop_seconds / seconds,
        "gflop_per_query": flops / 1e9,
        **with_spread("fraction_of_limit", [flops / s / 1e9 / limit for s, limit in zip(runs, limits)]),
        "fraction_of_encoding_1000_videos": seconds / encoding_1000_videos,
        # The same ratio in counted FLOPs: what the timed ratio is when both stages run equally close to the limit.
        "flop_fraction_of_encoding_1000_videos": flops / (1000 * encode["gflop_per_video"] * 1e9),
        "short_caption_ms_per_query": short_seconds * 1e3,
        "short_caption_gflop_per_query": counted_flops(short_caption) / 1e9,
        "short_caption_fraction_of_encoding_1000_videos": short_seconds / encoding_1000_videos,
    }
    return result


def write_long_video(path: str, seconds: int = 30, fps: int = 30, size: tuple[int, int] = (320, 240),
                     keyframe_interval: int = 250) -> None:
    """A moving-gradient H.264 video (x264's default keyframe interval of 250 frames)."""
    import av

    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.options = {"preset": "veryfast"}
        for index in range(seconds * fps):
            shift = index * 3
            channels = [(x + shift) % 256 + 0 * y, (y + shift) % 256 + 0 * x, np.full((height, width, 1), shift % 256)]
            frame = np.concatenate(channels, axis=-1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())


def peer_read_video(path: str, num_frames: int) -> np.ndarray:
    """CLIP4Clip's reader: OpenCV decodes every frame, one frame per second is kept, then uniformly subsampled."""
    import cv2

    capture = cv2.VideoCapture(path)
    fps = max(int(round(capture.get(cv2.CAP_PROP_FPS))), 1)
    kept, index = [], 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index % fps == 0:
            kept.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        index += 1
    capture.release()
    positions = np.linspace(0, len(kept) - 1, num=num_frames, dtype=int)
    return np.stack([kept[i] for i in positions])


def bench_decode(num_frames: int, workdir: str, count: int, repeats: int) -> dict:
    """Seconds per video of our sampler in both decoding modes and of the peer reader, interleaved (each repeat times
    the three readers one after the other, after a warm-up of each); the speed-up is that of the faster mode
    (`reference_frames`): the median over repeats of each repeat's ratio, with its spread."""
    from crosstvr.processing_crosstvr import read_video

    paths = []
    for index in range(count):
        path = os.path.join(workdir, f"long{index}.mp4")
        if not os.path.exists(path):
            write_long_video(path)
        paths.append(path)
    result = {"videos": count}
    readers = {
        decoding: (lambda decoding=decoding: [read_video(path, num_frames, decoding=decoding) for path in paths])
        for decoding in ("exact", "reference_frames")
    }
    try:
        import cv2  # noqa: F401

        readers["peer"] = lambda: [peer_read_video(path, num_frames) for path in paths]
    except ImportError:
        result["peer"] = "OpenCV is not installed (pip install -e .[benchmarks])"
    runs = {name: [] for name in readers}
    for reader in readers.values():
        reader()
    for _ in range(repeats):
        for name, reader in readers.items():
            start = time.perf_counter()
            reader()
            runs[name].append((time.perf_counter() - start) / count)
    for name, seconds in runs.items():
        result[f"{name}_s_per_video"] = float(np.median(seconds))
        result[f"{name}_frames_per_s"] = num_frames / result[f"{name}_s_per_video"]
    if "peer" in runs:
        for decoding, key in (("exact", "exact_speedup_over_peer"), ("reference_frames", "speedup_over_peer")):
            result.update(with_spread(key, [peer / ours for peer, ours in zip(runs["peer"], runs[decoding])]))
    return result


def write_clips(directory: str, count: int, size: int) -> None:
    from crosstvr.synthetic import write_video

    os.makedirs(directory, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        frames = generator.integers(0, 255, (24, size, size, 3), dtype=np.uint8)
        write_video(os.path.join(directory, f"clip{index:04d}.mp4"), frames)


def bench_index(model, processor, encode: dict, workdir: str, count: int) -> dict:
    from crosstvr.indexing import VideoIndex

    videos = os.path.join(workdir, f"clips{count}")
    write_clips(videos, count, model.config.vision_config.image_size)
    index_dir = tempfile.mkdtemp(dir=workdir)
    start = time.perf_counter()
    VideoIndex.build(videos, index_dir, model, processor, batch_size=4, num_workers=1, faiss_index=None,
                     progress=False)
    seconds = time.perf_counter() - start
    frames_per_s = count * model.config.num_frames / seconds
    return {"videos": count, "frames_per_s": frames_per_s,
            "fraction_of_encoder_only": frames_per_s / encode["frames_per_s"]}


def _token_bytes(index_dir: str) -> int:
    """Bytes of the stage-2 tokens (and their scales) in an index's chunk files, from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    chunks = os.path.join(index_dir, "chunks")
    for name in os.listdir(chunks):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(chunks, name), framework="pt") as file:
                for key in set(file.keys()) & {"vision_tokens", "vision_token_scales"}:
                    tensor = file.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def bench_tokens(model, processor, workdir: str, count: int, groups: int) -> dict:
    from crosstvr.default_model import load_default_model
    from crosstvr.indexing import VideoIndex
    from crosstvr.synthetic import write_benchmark
    from crosstvr.video_store import TOKEN_STORAGES

    videos = os.path.join(workdir, f"clips{count}")
    write_clips(videos, count, model.config.vision_config.image_size)
    data = os.path.join(workdir, "synthetic-2026")
    write_benchmark(data, seed=2026, groups=(1, 1, groups))
    with open(os.path.join(data, "annotations", "test_list.txt")) as file:
        test_ids = file.read().split()
    with open(os.path.join(data, "annotations", "raw-captions.json")) as file:
        captions = json.load(file)
    test_videos = os.path.join(workdir, "synthetic-2026-test")
    os.makedirs(test_videos, exist_ok=True)
    for video_id in test_ids:
        shutil.copy(os.path.join(data, "videos", f"{video_id}.mp4"), test_videos)
    default_model, default_processor = load_default_model()

    results = {}
    for storage in TOKEN_STORAGES:
        index = VideoIndex.build(videos, tempfile.mkdtemp(dir=workdir), model, processor, token_storage=storage,
                                 batch_size=4, num_workers=1, faiss_index=None, progress=False)
        results[f"{storage} bytes_per_video"] = _token_bytes(index.index_dir) / len(index)
        index.search("warm up", k=TOP_K, top_k_rerank=TOP_K)
        start = time.perf_counter()
        for query in ("a red circle moves left", "a blue square goes up, then a circle goes down"):
            index.search(query, k=TOP_K, top_k_rerank=TOP_K)
        results[f"{storage} ms_per_query"] = (time.perf_counter() - start) / 2 * 1000

        library = VideoIndex.build(test_videos, tempfile.mkdtemp(dir=workdir), default_model, default_processor,
                                   token_storage=storage, num_workers=1, faiss_index=None, progress=False)
        hits = [library.search(captions[video_id][0], k=1).hits[0].path for video_id in test_ids]
        recall = 100 * float(np.mean([os.path.basename(hit) == f"{video_id}.mp4" for hit, video_id in zip(hits, test_ids)]))
        results[f"{storage} synthetic_t2v_R1"] = recall
        results[f"{storage} synthetic_R1_change"] = abs(recall - results["float16 synthetic_t2v_R1"])
    return results


def clustered_embeddings(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 1,000 random centres: the neighbourhood structure of real video embeddings."""
    generator = np.random.default_rng(seed)
    centres = generator.standard_normal((1000, dim)).astype(np.float32)
    points = centres[generator.integers(0, 1000, count)] + 0.6 * generator.standard_normal((count, dim),
                                                                                        dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def bench_search(sizes: list[int], dim: int, queries: int) -> dict:
    from crosstvr.indexing import _faiss, build_faiss_index

    results = {}
    for size in sizes:
        database = clustered_embeddings(size, dim, seed=size)
        probe = clustered_embeddings(queries, dim, seed=size + 1)
        database_t, probe_t = torch.from_numpy(database), torch.from_numpy(probe)
        exact = (probe_t @ database_t.t()).topk(TOP_K, dim=1).indices.numpy()
        start = time.perf_counter()
        for row in probe_t:  # one query at a time: the latency a user sees
            (database_t @ row).topk(TOP_K)
        row = {"exact_ms_per_query": (time.perf_counter() - start) / queries * 1e3}
        if _faiss() is not None:
            start = time.perf_counter()
            index, kind, params = build_faiss_index(database, "ivf")
            row["ivf_build_s"] = time.perf_counter() - start
            row["ivf_nlist"] = params.get("nlist", 0)
            for nprobe in NPROBES:
                index.nprobe = nprobe
                start = time.perf_counter()
                found = np.concatenate([index.search(probe[i : i + 1], TOP_K)[1] for i in range(queries)])
                row[f"ivf{nprobe}_ms_per_query"] = (time.perf_counter() - start) / queries * 1e3
                row[f"ivf{nprobe}_recall_at_15"] = float(
                    np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found, exact)])
                )
        results[str(size)] = row
        del database, database_t
        gc.collect()
    return results


def bench_frames(sizes: list[int], dim: int, queries: int) -> dict:
    from crosstvr.indexing import _faiss, build_faiss_index, search_frames
    from crosstvr.modeling_crosstvr import text_conditioned_frame_similarity

    results = {}
    for size in sizes:
        # A video's frames scatter around its clustered embedding (frames of one shot look alike).
        videos = torch.from_numpy(clustered_embeddings(size, dim, seed=size))
        noise = torch.randn(size, FRAMES_PER_VIDEO, dim, generator=torch.Generator().manual_seed(size)) / dim**0.5
        frame_embeds = torch.nn.functional.normalize(videos[:, None] + 0.5 * noise, dim=-1)
        probe = torch.from_numpy(clustered_embeddings(queries, dim, seed=size + 1))
        start = time.perf_counter()
        exact = [text_conditioned_frame_similarity(query[None], frame_embeds)[0].topk(TOP_K).indices
                 for query in probe]
        row = {"exact_ms_per_query": (time.perf_counter() - start) / queries * 1e3,
               "bytes_per_video": FRAMES_PER_VIDEO * dim * 4}
        faiss = _faiss()
        if faiss is not None:
            index, _, params = build_faiss_index(frame_embeds.flatten(0, 1).numpy(), "ivf")
            row["ivf_nlist"] = params.get("nlist", 0)
            start = time.perf_counter()
            found = [search_frames(index, frame_embeds, text_conditioned_frame_similarity, query[None], TOP_K)[1]
                     for query in probe]
            row["ivf_frames_ms_per_query"] = (time.perf_counter() - start) / queries * 1e3
            row["ivf_frames_recall_at_15"] = float(
                np.mean([len(set(f.tolist()) & set(e.tolist())) / TOP_K for f, e in zip(found, exact)])
            )
        results[str(size)] = row
        del frame_embeds
        gc.collect()
    return results


def bench_train(model, processor, device: str, repeats: int) -> dict:
    batch = 2
    text = random_text(processor, model, batch, device)
    pixel_values = pixels(model, batch, device)
    from crosstvr.modeling_crosstvr import STAGE_TWO_TRAINABLE_MODULES

    trainable = [p for n, p in model.named_parameters() if n.split(".")[0] in STAGE_TWO_TRAINABLE_MODULES]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()
    with torch.no_grad():
        video = model.encode_video(pixel_values)
    cached = {"video_embeds": video.video_embeds, "vision_tokens": video.vision_tokens}

    def step(**video_inputs):
        loss = model(**text, **video_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def from_pixels():
        with torch.no_grad():  # the frozen towers, as in stage-2 training without a cache
            encoded = model.encode_video(pixel_values)
        step(video_embeds=encoded.video_embeds, vision_tokens=encoded.vision_tokens)

    cache_seconds = timed(lambda: step(**cached), device, repeats)
    pixel_seconds = timed(from_pixels, device, repeats)
    model.eval()
    return {"batch": batch, "cache_steps_per_s": 1 / cache_seconds, "pixel_steps_per_s": 1 / pixel_seconds,
            "speedup": pixel_seconds / cache_seconds}


MEMORY_CHILD = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {benchmarks!r})
from bench_performance import MEMORY_CHUNK_SIZE, build_model, peak_rss_mb, reset_peak_rss
from crosstvr.indexing import VideoIndex
model, processor = build_model({geometry!r}, "cpu")
baseline = reset_peak_rss()
if {mode!r} == "index":
    VideoIndex.build({videos!r}, {index_dir!r}, model, processor, batch_size=4, num_workers=1, faiss_index=None,
                     chunk_size=MEMORY_CHUNK_SIZE, progress=False)
else:
    index = VideoIndex.open({index_dir!r}, model, processor)
    index.search("a red circle goes left", k=10)
print(baseline, peak_rss_mb())
"""


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Reset this process's peak RSS to its current RSS (Linux: /proc/self/clear_refs) and return it in MB."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _peak_rss_mb(geometry: str, mode: str, videos: str, index_dir: str) -> tuple[float, float]:
    """(RSS with the model loaded, peak RSS while indexing or searching) of a fresh process, in MB."""
    code = MEMORY_CHILD.format(root=ROOT, benchmarks=os.path.join(ROOT, "benchmarks"), geometry=geometry, mode=mode,
                               videos=videos, index_dir=index_dir)
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    baseline, peak = output.strip().splitlines()[-1].split()
    return float(baseline), float(peak)


def bench_memory(geometry: str, image_size: int, workdir: str, count: int) -> dict:
    result = {}
    for videos in (count, 2 * count):
        folder = os.path.join(workdir, f"clips{videos}")
        write_clips(folder, videos, image_size)
        index_dir = os.path.join(workdir, f"memory-index{videos}")
        shutil.rmtree(index_dir, ignore_errors=True)
        result["model_rss_mb"], result[f"index_{videos}_peak_rss_mb"] = _peak_rss_mb(geometry, "index", folder,
                                                                                     index_dir)
        shards = [os.path.join(root, name) for root, _, names in os.walk(index_dir) for name in names
                  if name.endswith(".safetensors")]
        result["cache_bytes_per_video"] = sum(os.path.getsize(path) for path in shards) / videos
    result["search_peak_rss_mb"] = _peak_rss_mb(geometry, "search", folder, index_dir)[1]
    growth = result[f"index_{2 * count}_peak_rss_mb"] - result[f"index_{count}_peak_rss_mb"]
    result[f"index_peak_growth_mb_per_{count}_more_videos"] = growth
    return result


def bench_ivfpq(size: int, dim: int, queries: int, workdir: str) -> dict:
    import faiss

    from crosstvr.indexing import build_faiss_index, rescore_exactly

    database = clustered_embeddings(size, dim, seed=size)
    probe = clustered_embeddings(queries, dim, seed=size + 1)
    exact = (torch.from_numpy(probe) @ torch.from_numpy(database).t()).topk(TOP_K, dim=1).indices.numpy()
    start = time.perf_counter()
    index, kind, params = build_faiss_index(database, "ivfpq")
    result = {"build_s": time.perf_counter() - start, "kind": kind, "m": params.get("m", 0)}
    # In memory: the codes and ids of the inverted lists, plus the coarse centroids and the PQ codebooks.
    invlists = faiss.extract_index_ivf(index).invlists
    lists_bytes = sum(invlists.list_size(i) * (invlists.code_size + 8) for i in range(invlists.nlist))
    tables = params["nlist"] * dim * 4 + dim * 256 * 4
    result["bytes_per_video"] = (lists_bytes + tables) / size
    # The exact embeddings as the index keeps them: a float32 file, memory-mapped, read row by row for the shortlist.
    path = os.path.join(workdir, "stage1.f32")
    database.tofile(path)
    del database
    # What a search's first query adds to opening the catalog: the FAISS file read back (from the page cache, just
    # written), the exact file mapped, one query's shortlist re-scored.
    faiss_path = os.path.join(workdir, "ivfpq.index")
    faiss.write_index(index, faiss_path)
    del index
    start = time.perf_counter()
    index = faiss.read_index(faiss_path)
    embeddings = np.memmap(path, dtype=np.float32, mode="r", shape=(size, dim))
    _, shortlist = index.search(probe[:1], max(TOP_K, params["shortlist"]))
    rescore_exactly(embeddings, shortlist[0][shortlist[0] >= 0], probe[0], TOP_K)
    result["load_and_first_query_ms"] = (time.perf_counter() - start) * 1e3
    os.remove(faiss_path)
    start = time.perf_counter()
    found = []
    for query in probe:  # one query at a time, as search runs: PQ shortlist, then exact re-scoring
        _, shortlist = index.search(query[None], max(TOP_K, params["shortlist"]))
        found.append(rescore_exactly(embeddings, shortlist[0][shortlist[0] >= 0], query, TOP_K)[1])
    result["ms_per_query"] = (time.perf_counter() - start) / queries * 1e3
    result["shortlist"] = params["shortlist"]
    os.remove(path)
    result["recall_at_15"] = float(np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found, exact)]))
    return result


CATALOG_CHILD = """
import os, random, sys, time
import torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {benchmarks!r})
from bench_performance import peak_rss_mb, reset_peak_rss
from crosstvr import indexing
from crosstvr.default_model import build_tiny_model
from crosstvr.index_catalog import IndexCatalog
from crosstvr.video_store import EncodedBatch

def written():
    with open("/proc/self/io") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("wchar:"))

LIBRARY = "/data/video-library/"

def path(i):  # folders of 1,000 clips, about 60 characters a path
    return f"{{LIBRARY}}collection-{{i // 100_000:02d}}/{{i // 1000:05d}}/clip-{{i:08d}}.mp4"

def walk_videos(directory):  # the simulated library, listed in no particular order as a folder walk lists it
    return ((path(i), 1_000_000 + i, 1_700_000_000_000_000_000 + i) for i in reversed(range({count})))

def encode_videos(model, processor, paths, batch_size, num_workers, token_storage):  # the encoder, stubbed
    for first in range(0, len(paths), batch_size):
        batch = paths[first : first + batch_size]
        yield EncodedBatch(batch, None, torch.zeros(len(batch), 8), torch.ones(len(batch), 4, dtype=torch.int8), {{}})

if {mode!r} == "build":
    model, processor = build_tiny_model()
    indexing.walk_videos, indexing.encode_videos = walk_videos, encode_videos
    indexing._unchanged = lambda path, stat: True  # the simulated files exist, unchanged
    os.makedirs(os.path.join({index_dir!r}, "library"), exist_ok=True)
    baseline, before, start = reset_peak_rss(), written(), time.perf_counter()
    index = indexing.VideoIndex({index_dir!r}, model, processor, token_storage="none")
    update = index.add(os.path.join({index_dir!r}, "library"), batch_size=64, chunk_size=256, faiss_index=None,
                       progress=False)
    assert update["added"] == update["total"] == {count}, update
    print(baseline, peak_rss_mb(), written() - before, time.perf_counter() - start)
else:
    start = time.perf_counter()
    catalog = IndexCatalog(IndexCatalog.path_in({index_dir!r}))
    count = len(catalog)
    generation, rows = catalog.rows_at(random.Random(0).sample(range(count), 15))
    assert all(rows) and generation == 1
    print(count, (time.perf_counter() - start) * 1e3)
"""


def bench_catalog(sizes: list[int], workdir: str) -> dict:
    results = {}
    for size in sizes:
        index_dir = os.path.join(workdir, f"catalog-{size}")
        shutil.rmtree(index_dir, ignore_errors=True)
        runs = {}
        for mode in ("build", "open"):
            code = CATALOG_CHILD.format(root=ROOT, benchmarks=os.path.join(ROOT, "benchmarks"), mode=mode,
                                        index_dir=index_dir, count=size)
            runs[mode] = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                        text=True).stdout.split()
        baseline, peak, written, seconds = map(float, runs["build"])
        catalog = os.path.join(index_dir, "catalog.sqlite")
        on_disk = sum(os.path.getsize(catalog + suffix) for suffix in ("", "-wal") if os.path.exists(catalog + suffix))
        results[f"{size} peak_rss_above_model_mb"] = peak - baseline
        results[f"{size} bytes_written_per_video"] = written / size
        results[f"{size} catalog_bytes_on_disk_per_video"] = on_disk / size
        results[f"{size} index_s"] = seconds
        results[f"{size} open_and_first_lookup_ms"] = float(runs["open"][1])
        shutil.rmtree(index_dir)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------

TARGETS = {
    ("memory", "cache_bytes_per_video"): ("<=", 1_000_000),
    ("encode", "fraction_of_limit"): (">=", 0.85),
    ("rerank", "fraction_of_limit"): (">=", 0.85),
    ("index", "fraction_of_encoder_only"): (">=", 0.90),
    ("decode", "speedup_over_peer"): (">=", 5.0),
    ("rerank", "fraction_of_encoding_1000_videos"): ("<=", 0.01),
    ("train", "speedup"): (">=", 5.0),
    ("ivfpq", "bytes_per_video"): ("<=", 64),
    ("tokens", "int8 bytes_per_video"): ("<=", 500_000),
    ("tokens", "int8 synthetic_R1_change"): ("<=", 0.2),
    ("tokens", "none bytes_per_video"): ("<=", 0),
    ("ivfpq", "recall_at_15"): (">=", 0.95),
    ("ivfpq", "ms_per_query"): ("<=", 20),
    ("catalog", "1000000 open_and_first_lookup_ms"): ("<=", 2000),
    **{("catalog", f"{size} peak_rss_above_model_mb"): ("<=", 100) for size in (10_000, 100_000, 1_000_000)},
}


def table(results: dict) -> str:
    lines = ["| section | measure | value | target |", "| --- | --- | --- | --- |"]
    for section, values in results.items():
        rows = values.items() if section not in ("search", "frames") else (
            (f"{size} {key}", value) for size, row in values.items() for key, value in row.items()
        )
        for key, value in rows:
            target = TARGETS.get((section, key))
            mark = ""
            if target and isinstance(value, (int, float)):
                met = value >= target[1] if target[0] == ">=" else value <= target[1]
                mark = f"{target[0]} {target[1]:g} ({'met' if met else 'missed'})"
            if section == "search" and key.endswith("recall_at_15"):
                mark = f">= 0.99 ({'met' if value >= 0.99 else 'missed'})"
            if key.startswith("1000000 ivf") and key.endswith("ms_per_query"):
                mark = f"<= 20 ({'met' if value <= 20 else 'missed'})"
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {section} | {key} | {shown} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--geometry", choices=("base", "tiny"), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="precision of the towers (stage 2 stays float32), and of the limit's matrix products")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
    parser.add_argument("--fine-module", choices=("crosstvr", "t2v2t"), default="crosstvr", help="stage 2's design")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--memory-videos", type=int, help="N of the memory section (N and 2N videos; default 8)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 3
    dtype = getattr(torch, args.dtype)
    model, processor = build_model(args.geometry, args.device, args.fine_module, dtype)
    results = {}
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        results["limit"] = {"matmul_gflop_per_s": matmul_limit(args.device, 10, dtype), "dtype": args.dtype,
                            "device": torch.cuda.get_device_name() if args.device == "cuda" else
                            f"cpu x{torch.get_num_threads()} threads"}
        encode = bench_encode(model, args.device, repeats)
        if "encode" in args.sections:
            results["encode"] = encode
        if "rerank" in args.sections:
            results["rerank"] = bench_rerank(model, processor, args.device, encode, repeats)
        if "decode" in args.sections:
            results["decode"] = bench_decode(model.config.num_frames, workdir, 1 if args.quick else 3, max(repeats, 3))
        if "index" in args.sections:
            results["index"] = bench_index(model, processor, encode, workdir, 4 if args.quick else 16)
        if "search" in args.sections:
            sizes = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
            results["search"] = bench_search(sizes, model.config.projection_dim, 20 if args.quick else 200)
        if "train" in args.sections:
            results["train"] = bench_train(model, processor, args.device, repeats)
        if "memory" in args.sections:
            results["memory"] = bench_memory(args.geometry, model.config.vision_config.image_size, workdir,
                                             args.memory_videos or (2 if args.quick else 8))
        if "ivfpq" in args.sections:
            results["ivfpq"] = bench_ivfpq(12_000 if args.quick else 2_000_000, model.config.projection_dim,
                                           20 if args.quick else 200, workdir)
        if "tokens" in args.sections:
            results["tokens"] = bench_tokens(model, processor, workdir, 4 if args.quick else 16, 2 if args.quick else 50)
        if "frames" in args.sections:
            results["frames"] = bench_frames([2_000] if args.quick else [10_000, 100_000], model.config.projection_dim,
                                             20 if args.quick else 100)
        if "catalog" in args.sections:
            results["catalog"] = bench_catalog([10_000] if args.quick else [10_000, 100_000, 1_000_000], workdir)
    print(table(results))
    print(json.dumps({"benchmark": "performance", "geometry": args.geometry, "fine_module": args.fine_module, **results},
                     default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
