"""A searchable index of a video library: what CrossTVR needs of every video, computed once and kept on disk.

    index/
      manifest.json                  model and frame-sampling fingerprints; every indexed video (path, size, mtime,
                                     chunk, row); files that could not be read, with why; the FAISS parameters
      chunks/chunk-<hash>.safetensors   stage-1 embeddings and stage-2 tokens of a group of videos (video_store)
      chunks/chunk-<hash>.json          the group's videos and failures; written last, so its presence = done
      faiss.index                    the stage-1 ANN index, when FAISS is installed

Indexing decodes videos in DataLoader workers while the model encodes the previous batch, and writes a chunk every
`chunk_size` videos. Every file is written under a temporary name and renamed, and a chunk counts only once its JSON
exists, so a killed run leaves nothing that loads wrong; running again resumes, skipping finished chunks (chunk names
depend only on their videos, so the result is the same as an uninterrupted run). Re-running on a library adds new
videos, re-encodes changed ones (size or modification time) and drops deleted ones; a chunk whose videos are all gone
is deleted. Unreadable files are skipped and listed in the manifest (retried when they change). Under `accelerate`
(or torchrun) several processes split the work, each writing its own chunks; the main process merges the manifest.

Search encodes the query, ranks all videos by stage-1 cosine similarity (FAISS when an index was built, an exact matrix
product otherwise) and re-ranks the top K with stage 2.
"""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .loading import load_model
from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor
from .search import SearchHit, SearchResult, find_videos
from .video_store import (
    ShardReader,
    encode_videos,
    model_fingerprint,
    processor_fingerprint,
    write_json_atomically,
    write_shard,
)


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FAISS_KINDS = ("flat", "ivf", "hnsw")
MANIFEST = "manifest.json"
CHUNKS = "chunks"
FAISS_FILE = "faiss.index"


def read_manifest(index_dir: str | os.PathLike) -> dict | None:
    """The manifest of the index in `index_dir`, or None when there is none (no index yet)."""
    path = os.path.join(os.fspath(index_dir), MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class IndexMismatchError(ValueError):
    """The index was built with another model or other frame sampling."""


def _stat(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _chunk_name(paths: list[str]) -> str:
    return "chunk-" + hashlib.sha1("\n".join(paths).encode()).hexdigest()[:16]


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_faiss_index(embeddings, kind: str):
    """
    A FAISS inner-product index of `(count, dim)` float32 `embeddings`: "flat" (exact), "ivf" (IVFFlat with
    4 sqrt(count) lists, 128 probed; flat below 1,024 vectors, too few to train the lists) or "hnsw" (M 32,
    efConstruction 200, efSearch 128). Returns (index, the kind built, its parameters).

    128 probes: on a million clustered 512-d embeddings, recall of the exact top 15 is 0.996 at 9 ms per query on two
    CPU cores (32 probes: 0.954 at 3 ms); see `benchmarks/bench_performance.py --sections search`.
    """
    faiss = _faiss()
    count, dim = embeddings.shape
    params = {}
    if kind == "ivf" and count >= 1024:
        params = {"nlist": int(4 * count**0.5), "nprobe": 128}
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample of 40 vectors per list (FAISS asks for 39 to 256 per list): on all of a million
        # vectors it takes over ten minutes on two cores.
        sample = np.random.default_rng(0).choice(count, min(count, 40 * params["nlist"]), replace=False)
        index.train(embeddings[np.sort(sample)])
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        params = {"M": 32, "efConstruction": 200, "efSearch": 128}
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
    else:
        if kind == "ivf":
            logger.info("%d videos are too few to train IVF lists: using an exact (flat) FAISS index", count)
        kind = "flat"
        index = faiss.IndexFlatIP(dim)
    index.add(embeddings)
    return index, kind, params


class VideoIndex:
    """
    A video library index (see the module docstring). Open one with [`VideoIndex.open`], create or update it with
    [`VideoIndex.build`] / [`VideoIndex.add`], query it with [`VideoIndex.search`].

    Args:
        index_dir: the index folder (created by `add` if missing).
        model, processor: the model and processor; an existing index must have been built with the same ones.
        model_name: how to find the model again (a path or Hub id), recorded in the manifest; `None` for the embedded
            default.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: CrossTVRModel,
        processor: CrossTVRProcessor,
        model_name: str | None = None,
    ):
        self.index_dir = os.fspath(index_dir)
        self.model, self.processor = model, processor
        self.fingerprint = {"model": model_fingerprint(model), "processor": processor_fingerprint(processor)}
        self.manifest = read_manifest(self.index_dir)
        if self.manifest is not None:
            self._check(self.manifest)
        else:
            self.manifest = {
                "format_version": FORMAT_VERSION,
                "model_name": model_name,
                **self.fingerprint,
                "videos": {},
                "skipped": {},
                "chunks": [],
                "faiss": None,
            }
        self._reader = ShardReader(os.path.join(self.index_dir, CHUNKS))
        self._embeds = None

    @classmethod
    def open(
        cls, index_dir: str | os.PathLike, model: CrossTVRModel | None = None, processor: CrossTVRProcessor | None = None
    ) -> "VideoIndex":
        """Open an existing index, loading the model it was built with unless one is given."""
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise FileNotFoundError(f"{os.fspath(index_dir)} is not a video index (no {MANIFEST}); build one first")
        model_name = manifest["model_name"]
        if model is None:
            model, processor = load_model(model_name)
        return cls(index_dir, model, processor, model_name)

    @classmethod
    def build(
        cls,
        video_dir: str | os.PathLike,
        index_dir: str | os.PathLike,
        model: CrossTVRModel,
        processor: CrossTVRProcessor,
        model_name: str | None = None,
        **add_kwargs,
    ) -> "VideoIndex":
        """Create (or update) the index of `video_dir` in `index_dir`; `add_kwargs` go to [`VideoIndex.add`]."""
        index = cls(index_dir, model, processor, model_name)
        index.last_update = index.add(video_dir, **add_kwargs)
        return index

    def _check(self, manifest: dict) -> None:
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(f"{self.index_dir} has index format {manifest.get('format_version')}; rebuild it")
        if manifest["processor"] != self.fingerprint["processor"]:
            raise IndexMismatchError(
                f"{self.index_dir} was indexed with other frame sampling or preprocessing; rebuild it with this "
                "processor or use the processor it was built with"
            )
        if manifest["model"] != self.fingerprint["model"]:
            recorded = manifest.get("model_name") or "the embedded default model"
            raise IndexMismatchError(
                f"{self.index_dir} was indexed with another model ({recorded}); search it with that model, or "
                "rebuild the index (a new --index folder) for this one"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Indexing
    # ----------------------------------------------------------------------------------------------------------------

    def _save(self) -> None:
        os.makedirs(self.index_dir, exist_ok=True)
        write_json_atomically(os.path.join(self.index_dir, MANIFEST), self.manifest)

    def _merge_finished_chunks(self) -> None:
        """Record every finished chunk that the manifest does not know yet: from an interrupted run, or from the other
        processes. A chunk's entry wins when the file it describes is unchanged on disk."""
        chunk_dir = os.path.join(self.index_dir, CHUNKS)
        if not os.path.isdir(chunk_dir):
            return
        known = set(self.manifest["chunks"])
        for name in sorted(os.listdir(chunk_dir)):
            chunk = name[: -len(".json")]
            if not name.endswith(".json") or chunk in known:
                continue
            with open(os.path.join(chunk_dir, name), encoding="utf-8") as file:
                record = json.load(file)
            for row, (path, stat) in enumerate(record["videos"]):
                if os.path.exists(path) and _stat(path) == stat:
                    self.manifest["videos"][path] = {"stat": stat, "chunk": chunk, "row": row}
                    self.manifest["skipped"].pop(path, None)
            for path, (stat, reason) in record["skipped"].items():
                if os.path.exists(path) and _stat(path) == stat:
                    self.manifest["skipped"][path] = [stat, reason]
            self.manifest["chunks"].append(chunk)

    def _delete_dead_chunks(self) -> None:
        live = {entry["chunk"] for entry in self.manifest["videos"].values()}
        for chunk in [chunk for chunk in self.manifest["chunks"] if chunk not in live]:
            self._reader.close(f"{chunk}.safetensors")
            for suffix in (".json", ".safetensors"):
                path = os.path.join(self.index_dir, CHUNKS, chunk + suffix)
                if os.path.exists(path):
                    os.remove(path)
            self.manifest["chunks"].remove(chunk)

    def add(
        self,
        video_dir: str | os.PathLike,
        batch_size: int = 8,
        num_workers: int = 2,
        chunk_size: int = 256,
        faiss_index: str | None = "flat",
        progress: bool = True,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """
        Bring the index up to date with `video_dir` (searched recursively): encode new and changed videos, drop
        deleted ones, and rebuild the FAISS index (`faiss_index`: "flat", "ivf", "hnsw", or None for exact search
        only; ignored when FAISS is not installed). `on_progress(done, total)` is called as this process's videos are
        encoded (for a progress display other than the tqdm bar). Returns what changed: lists `added`, `updated`,
        `removed`, the files `skipped` (path -> reason), and the `total` of indexed videos.
        """
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        if faiss_index is not None and faiss_index not in FAISS_KINDS:
            raise ValueError(f"faiss_index={faiss_index!r} is not one of {FAISS_KINDS} or None")
        # Like `Accelerator`, honour ACCELERATE_USE_CPU: without it, PartialState under torchrun on a machine without
        # GPUs reports a single process, and every process would index every video.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        files = {os.path.abspath(path): _stat(path) for path in find_videos(video_dir)}
        root = os.path.abspath(video_dir) + os.sep
        self._merge_finished_chunks()
        videos, skipped = self.manifest["videos"], self.manifest["skipped"]
        removed = sorted(
            path for path in videos if not os.path.exists(path) or (path.startswith(root) and path not in files)
        )
        updated = sorted(path for path, stat in files.items() if path in videos and videos[path]["stat"] != stat)
        added = sorted(
            path for path, stat in files.items() if path not in videos and (path not in skipped or skipped[path][0] != stat)
        )
        for path in removed + updated:
            del videos[path]
        for path in [path for path in skipped if path not in files or skipped[path][0] != files[path]]:
            del skipped[path]

        todo = sorted(added + updated)
        chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
        mine = chunks[state.process_index :: state.num_processes]
        os.makedirs(os.path.join(self.index_dir, CHUNKS), exist_ok=True)
        total = sum(map(len, mine))
        bar = tqdm(total=total, desc="indexing", unit="video", disable=not (progress and state.is_local_main_process))
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            bar.update(count)
            if on_progress is not None:
                on_progress(done, total)

        for chunk in mine:
            name = _chunk_name(chunk)
            if os.path.exists(os.path.join(self.index_dir, CHUNKS, f"{name}.json")):
                advance(len(chunk))  # finished before an interruption
                continue
            batches = []
            for batch in encode_videos(self.model, self.processor, chunk, batch_size, num_workers):
                batches.append(batch)
                advance(len(batch.paths) + len(batch.errors))
            failures = {path: reason for batch in batches for path, reason in batch.errors.items()}
            for path, reason in failures.items():
                logger.warning("skipping %s: %s", path, reason)
            encoded = [path for batch in batches for path in batch.paths]
            if encoded:
                write_shard(os.path.join(self.index_dir, CHUNKS, f"{name}.safetensors"), batches, metadata={})
            write_json_atomically(
                os.path.join(self.index_dir, CHUNKS, f"{name}.json"),
                {
                    "videos": [[path, files[path]] for path in encoded],
                    "skipped": {path: [files[path], reason] for path, reason in failures.items()},
                },
            )
            if state.num_processes == 1:
                self._merge_finished_chunks()
                self._save()
        bar.close()

        state.wait_for_everyone()
        if state.is_main_process:
            self._merge_finished_chunks()
            self._delete_dead_chunks()
            self._build_faiss(faiss_index)
            self._save()
        state.wait_for_everyone()
        with open(os.path.join(self.index_dir, MANIFEST), encoding="utf-8") as file:
            self.manifest = json.load(file)
        self._embeds = None
        new_skips = {path: self.manifest["skipped"][path][1] for path in todo if path in self.manifest["skipped"]}
        return {
            "added": [path for path in added if path in self.manifest["videos"]],
            "updated": [path for path in updated if path in self.manifest["videos"]],
            "removed": removed,
            "skipped": new_skips,
            "total": len(self.manifest["videos"]),
        }

    def _build_faiss(self, kind: str | None) -> None:
        """(Re)build the FAISS index of the stage-1 embeddings, in `self.paths` order."""
        faiss_path = os.path.join(self.index_dir, FAISS_FILE)
        faiss = _faiss()
        if kind is None or faiss is None or not self.manifest["videos"]:
            if kind is not None and faiss is None:
                logger.info("FAISS is not installed (pip install faiss-cpu): searches use an exact matrix product")
            self.manifest["faiss"] = None
            if os.path.exists(faiss_path):
                os.remove(faiss_path)
            return
        self._embeds = None
        index, kind, params = build_faiss_index(self.stage1_embeddings().numpy(), kind)
        staging = faiss_path + ".partial"
        faiss.write_index(index, staging)
        os.replace(staging, faiss_path)
        self.manifest["faiss"] = {"kind": kind, "params": params, "count": index.ntotal}

    # ----------------------------------------------------------------------------------------------------------------
    # Search
    # ----------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.manifest["videos"])

    @property
    def paths(self) -> list[str]:
        """The indexed videos, sorted: the row order of [`stage1_embeddings`] and of the FAISS index."""
        return sorted(self.manifest["videos"])

    def stage1_embeddings(self) -> torch.Tensor:
        """`(videos, projection_dim)` stage-1 embeddings of the indexed videos, in `paths` order (cached)."""
        if self._embeds is None:
            rows = [self.manifest["videos"][path] for path in self.paths]
            by_chunk = {}
            for position, entry in enumerate(rows):
                by_chunk.setdefault(entry["chunk"], []).append((position, entry["row"]))
            embeds = torch.empty(len(rows), self.model.config.projection_dim)
            for chunk, pairs in by_chunk.items():
                chunk_embeds = self._reader.tensor(f"{chunk}.safetensors", "video_embeds")
                positions, chunk_rows = zip(*pairs)
                embeds[list(positions)] = chunk_embeds[list(chunk_rows)].float()
            self._embeds = embeds
        return self._embeds

    def _stage1_top(self, text_embeds: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best `n` videos by stage-1 similarity: `(scores (n,), rows (n,))`, FAISS or exact."""
        faiss_info = self.manifest.get("faiss")
        faiss = _faiss()
        if faiss_info is not None and faiss is not None:
            if not hasattr(self, "_faiss_index"):
                self._faiss_index = faiss.read_index(os.path.join(self.index_dir, FAISS_FILE))
                if "nprobe" in faiss_info["params"]:
                    self._faiss_index.nprobe = faiss_info["params"]["nprobe"]
                if "efSearch" in faiss_info["params"]:
                    self._faiss_index.hnsw.efSearch = faiss_info["params"]["efSearch"]
            scores, rows = self._faiss_index.search(text_embeds.float().numpy(), n)
            keep = rows[0] >= 0
            return torch.from_numpy(scores[0][keep]), torch.from_numpy(rows[0][keep]).long()
        similarity = self.stage1_embeddings() @ text_embeds[0].float()  # (videos,)
        order = similarity.sort(descending=True, stable=True).indices[:n]
        return similarity[order], order

    @torch.no_grad()
    def search(self, query: str, k: int = 10, top_k_rerank: int | None = None, rerank: bool = True) -> SearchResult:
        """
        The `k` best videos for `query`: the stage-1 top K (`top_k_rerank`, default the model's `rerank_top_k`)
        re-ranked by s_coarse + w * s_fine, then the next ones in stage-1 order. `rerank=False` gives stage 1 alone.
        The result's `stage1_hits` are stage 1's own top `k`, from the same pass.
        """
        if not len(self):
            raise ValueError(f"the index in {self.index_dir} holds no video")
        top_k = self.model.config.rerank_top_k if top_k_rerank is None else top_k_rerank
        text = self.processor(text=[query])
        text_embeds = self.model.get_text_features(
            text["input_ids"].to(self.model.device), text["attention_mask"].to(self.model.device)
        ).cpu()
        scores, rows = self._stage1_top(text_embeds, min(max(k, top_k if rerank else 0), len(self)))
        paths = self.paths
        candidates = [paths[row] for row in rows.tolist()]
        stage1_hits = [
            SearchHit(rank=i + 1, path=path, score=score, coarse_score=score, reranked=False)
            for i, (path, score) in enumerate(zip(candidates[:k], scores.tolist()))
        ]
        if not (rerank and top_k > 0):
            return SearchResult(query=query, hits=stage1_hits, stage1_hits=stage1_hits)
        entries = [self.manifest["videos"][path] for path in candidates]
        cached = [self._reader.row(f"{e['chunk']}.safetensors", e["row"]) for e in entries]
        reranked = self.model.rerank_text_to_video(
            scores[None],
            text["qformer_input_ids"],
            text["qformer_attention_mask"],
            torch.stack([c["vision_tokens"] for c in cached]),
            torch.stack([c["video_mask"] for c in cached]),
            top_k=top_k,
        )
        ranking = reranked.ranking[0].tolist()
        top = reranked.top_k_indices[0].tolist()
        fused = dict(zip(top, reranked.fused_scores[0].tolist()))
        fine = dict(zip(top, reranked.fine_scores[0].tolist()))
        hits = [
            SearchHit(
                rank=rank + 1,
                path=candidates[index],
                score=fused.get(index, scores[index].item()),
                coarse_score=scores[index].item(),
                reranked=index in fused,
                fine_score=fine.get(index),
            )
            for rank, index in enumerate(ranking[:k])
        ]
        return SearchResult(query=query, hits=hits, stage1_hits=stage1_hits)


def write_contact_sheet(
    result: SearchResult, path: str | os.PathLike, frames_per_hit: int = 4, thumbnail_height: int = 96
) -> None:
    """A PNG of the hits of `result`, one row per hit: rank, file name, scores, and `frames_per_hit` frames."""
    from PIL import Image, ImageDraw

    from .processing_crosstvr import read_video

    label_width, margin = 260, 6
    rows = []
    for hit in result.hits:
        try:
            frames = [Image.fromarray(frame) for frame in read_video(hit.path, frames_per_hit)]
        except (OSError, ValueError) as error:
            logger.warning("no frames for the contact sheet from %s: %s", hit.path, error)
            frames = []
        rows.append([f.resize((max(1, f.width * thumbnail_height // f.height), thumbnail_height)) for f in frames])
    width = label_width + max([sum(f.width + margin for f in row) for row in rows] + [0])
    sheet = Image.new("RGB", (width, (thumbnail_height + margin) * len(rows) + 28), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((margin, 8), f'query: "{result.query}"', fill="black")
    for index, (hit, row) in enumerate(zip(result.hits, rows)):
        top = 28 + index * (thumbnail_height + margin)
        label = f"{hit.rank}. {os.path.basename(hit.path)}\nscore {hit.score:.3f}{' (re-ranked)' if hit.reranked else ''}"
        draw.multiline_text((margin, top + 4), label + f"\nstage 1 {hit.coarse_score:.3f}", fill="black")
        left = label_width
        for frame in row:
            sheet.paste(frame, (left, top))
            left += frame.width + margin
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    staging = os.fspath(path) + ".partial.png"
    sheet.save(staging)
    shutil.move(staging, os.fspath(path))
