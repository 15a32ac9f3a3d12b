"""A searchable index of a video library: what CrossTVR needs of every video, computed once and kept on disk.

    index/
      catalog.sqlite                 settings (model and frame-sampling fingerprints, FAISS parameters) and the
                                     bookkeeping of every video: path, size, mtime, chunk, row; files that could not
                                     be read, with why; the videos' order in the stage-1 structures (`index_catalog`)
      chunks/chunk-<hash>.safetensors   stage-1 embeddings and stage-2 tokens of a group of videos (video_store), the
                                     tokens as the index's token storage says: float16, int8 with a scale per
                                     token, or none (recomputed from the K videos a search re-ranks)
      chunks/chunk-<hash>.json          the group's videos and failures; written last, so its presence = done
      faiss-<generation>.index       the stage-1 ANN index, when FAISS is installed

Indexing decodes videos in DataLoader workers while the model encodes the previous batch, and writes a chunk every
`chunk_size` videos; the main process records each finished chunk in the catalog in one SQLite transaction, so the
bookkeeping written grows linearly with the library and nothing holds the whole library's records in memory. Every
file is written under a temporary name and renamed, and a chunk counts only once its JSON exists, so a killed run
leaves nothing that loads wrong; running again resumes, skipping finished chunks (chunk names depend only on their
videos and their sizes and times, so the result is the same as an uninterrupted run). Re-running on a library adds
new videos, re-encodes changed ones (size or modification time) and drops deleted ones; a chunk whose videos are all
gone is deleted. Unreadable files are skipped and recorded (retried when they change). Under `accelerate` (or
torchrun) several processes split the work, each writing its own chunk files; the main process is the catalog's only
writer. Indexes of the first format (one `manifest.json`) are migrated to the catalog when opened.

Search encodes the query, ranks all videos by stage-1 cosine similarity (FAISS when an index was built, an exact matrix
product otherwise) and re-ranks the top K with stage 2. Each rebuild of the stage-1 structures is a new generation
(its own FAISS file, the positions renumbered in the same transaction); a search that finds the generation changed
under it reloads them, so searches may run while another process or thread updates the index.
"""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .index_catalog import CATALOG, IndexCatalog
from .loading import load_model
from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor
from .search import SearchHit, SearchResult, walk_videos
from .video_store import (
    TOKEN_STORAGES,
    ShardReader,
    encode_videos,
    model_fingerprint,
    processor_fingerprint,
    write_json_atomically,
    write_shard,
)


logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
FAISS_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
# IVF-PQ's codes: at most this many bytes per video in memory, the 8-byte id its inverted lists keep included.
IVFPQ_BYTES_PER_VIDEO = 64
IVFPQ_MIN_VIDEOS = 10_000  # 256 centroids per sub-quantiser need about 39 x 256 training vectors
# IVF-PQ searches take this many candidates from the codes and re-score them with the exact embeddings, which a
# float32 matrix file beside the FAISS file holds (read, not loaded): at 2M clustered videos 2,048 reach recall@15
# 0.925 and 4,096 reach 0.973 at 7.6 ms per query (benchmarks/bench_performance.py --sections ivfpq).
IVFPQ_SHORTLIST = 4096
LEGACY_MANIFEST = "manifest.json"  # format 1: the whole bookkeeping in one JSON document
CHUNKS = "chunks"
HEADER_KEYS = ("format_version", "model_name", "model", "processor", "faiss")


def index_exists(index_dir: str | os.PathLike) -> bool:
    """Whether `index_dir` holds a video index (of any format)."""
    return os.path.exists(IndexCatalog.path_in(index_dir)) or os.path.exists(
        os.path.join(os.fspath(index_dir), LEGACY_MANIFEST)
    )


def _dtype_name(model: CrossTVRModel) -> str:
    """The precision of the model's towers ("float32", "bfloat16", "float16"), as the catalog records it."""
    return str(model.dtype).removeprefix("torch.")


def read_index_settings(index_dir: str | os.PathLike) -> dict | None:
    """The settings of the index in `index_dir` (format version, model name and fingerprints, FAISS parameters), or
    None when there is no index."""
    index_dir = os.fspath(index_dir)
    if os.path.exists(IndexCatalog.path_in(index_dir)):
        catalog = IndexCatalog(IndexCatalog.path_in(index_dir))
        try:
            return catalog.settings()
        finally:
            catalog.close()
    legacy = os.path.join(index_dir, LEGACY_MANIFEST)
    if not os.path.exists(legacy):
        return None
    with open(legacy, encoding="utf-8") as file:
        manifest = json.load(file)
    return {key: manifest.get(key) for key in HEADER_KEYS}


def migrate_legacy_manifest(index_dir: str) -> None:
    """Move a format-1 index's `manifest.json` into a catalog: written beside it under a temporary name, then renamed,
    then the manifest removed; the chunk files and the FAISS index (whose rows are in path order, the catalog's
    positions) stay as they are."""
    with open(os.path.join(index_dir, LEGACY_MANIFEST), encoding="utf-8") as file:
        manifest = json.load(file)
    final_path = IndexCatalog.path_in(index_dir)
    staging = final_path + ".partial"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(staging + suffix):
            os.remove(staging + suffix)
    catalog = IndexCatalog(staging)
    faiss_info = manifest.get("faiss")
    if faiss_info is not None:
        os.replace(os.path.join(index_dir, "faiss.index"), os.path.join(index_dir, "faiss-1.index"))
        faiss_info = {**faiss_info, "file": "faiss-1.index"}
    with catalog.transaction() as connection:
        catalog.set_settings(connection, format_version=FORMAT_VERSION, model_name=manifest["model_name"],
                             model=manifest["model"], processor=manifest["processor"])
        connection.executemany(
            "INSERT INTO skipped (path, size, mtime_ns, reason) VALUES (?, ?, ?, ?)",
            [(path, stat[0], stat[1], reason) for path, (stat, reason) in manifest["skipped"].items()],
        )
    by_chunk = {name: [] for name in manifest["chunks"]}  # one pass over the videos, not one per chunk
    for path, entry in manifest["videos"].items():
        by_chunk[entry["chunk"]].append((path, entry["stat"], entry["row"]))
    for name, videos in by_chunk.items():
        catalog.record_chunk(name, videos, {})
    catalog.renumber(1, faiss=faiss_info)
    catalog.journal_mode("DELETE")  # fold the write-ahead log into the file before renaming it
    catalog.close()
    os.replace(staging, final_path)
    os.remove(os.path.join(index_dir, LEGACY_MANIFEST))
    logger.info("migrated the index in %s from manifest.json to %s", index_dir, os.path.basename(final_path))


class IndexMismatchError(ValueError):
    """The index was built with another model or other frame sampling."""


def _stat(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _unchanged(path: str, stat: list[int]) -> bool:
    """Whether the file `path` exists and still has the `[size, mtime_ns]` it had when it was encoded."""
    return os.path.exists(path) and _stat(path) == stat


def _chunk_name(files: list[tuple[str, list[int]]]) -> str:
    """A name that depends on the chunk's videos (path, [size, mtime_ns]) and their versions (so re-encoding a
    changed video never meets the finished chunk of its earlier version)."""
    return "chunk-" + hashlib.sha1("\n".join(f"{path}\t{stat}" for path, stat in files).encode()).hexdigest()[:16]


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_faiss_index(embeddings, kind: str):
    """
    A FAISS inner-product index of `(count, dim)` float32 `embeddings`: "flat" (exact), "ivf" (IVFFlat with
    4 sqrt(count) lists, 128 probed; flat below 1,024 vectors, too few to train the lists), "hnsw" (M 32,
    efConstruction 200, efSearch 128) or "ivfpq" (IVF lists as "ivf" holding product-quantised codes of m bytes, m the
    largest divisor of `dim` with m + 8 <= 64 bytes per video; flat below 10,000 vectors; searches re-score a shortlist
    of `IVFPQ_SHORTLIST` candidates with the exact embeddings, see [`rescore_exactly`]). Returns (index, the kind
    built, its parameters).

    128 probes: on a million clustered 512-d embeddings, recall of the exact top 15 is 0.996 at 9 ms per query on two
    CPU cores (32 probes: 0.954 at 3 ms); see `benchmarks/bench_performance.py --sections search`.
    """
    faiss = _faiss()
    count, dim = embeddings.shape
    params = {}
    if kind == "ivfpq" and count >= IVFPQ_MIN_VIDEOS:
        m = max(m for m in range(1, dim + 1) if dim % m == 0 and m + 8 <= IVFPQ_BYTES_PER_VIDEO)
        params = {"nlist": int(4 * count**0.5), "m": m, "nbits": 8, "nprobe": 128, "shortlist": IVFPQ_SHORTLIST}
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(count, min(count, max(40 * params["nlist"], 64 * 256)), replace=False)
        index.train(embeddings[np.sort(sample)])
        index.nprobe = params["nprobe"]
    elif kind == "ivf" and count >= 1024:
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
        if kind in ("ivf", "ivfpq"):
            logger.info("%d videos are too few to train %s: using an exact (flat) FAISS index", count, kind.upper())
        kind = "flat"
        index = faiss.IndexFlatIP(dim)
    index.add(embeddings)
    return index, kind, params


def rescore_exactly(
    embeddings: np.ndarray, shortlist: np.ndarray, query: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """
    The best `n` of the `shortlist` positions by the exact inner product with `query` `(dim,)`: `(scores, positions)`,
    best first (ties by position). `embeddings` `(videos, dim)` may be a memory-mapped file: only the shortlist's rows
    are read, in file order.
    """
    positions = np.unique(shortlist)  # sorted: the rows are read front to back
    scores = embeddings[positions].astype(np.float32) @ query.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:n]
    return scores[order], positions[order]


def search_frames(
    faiss_index, frame_embeds: torch.Tensor, similarity: Callable, text_embeds: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The best `n` videos for one query under a frame-level similarity head, from a FAISS index of the videos' frames
    (row = video * frames + frame): fetch the best frames, score their videos exactly (`similarity(text_embeds,
    frame_embeds[videos])`, e.g. [`CrossTVRModel.get_similarity`]), and fetch 4x more frames until the n-th exact score
    reaches the last fetched frame's cosine. The head's score is a weighted mean of a video's frame cosines, so at most
    its best frame's: no video without a fetched frame can score higher, and with a flat index the result is exact.
    Returns `(scores (n,), video positions (n,))`, best first.

    Args:
        faiss_index: inner-product FAISS index of `frame_embeds.flatten(0, 1)`.
        frame_embeds: `(videos, frames, dim)`.
        text_embeds: `(1, dim)`.
    """
    frames, count = frame_embeds.shape[1], faiss_index.ntotal
    fetch = min(count, 2 * n * frames)
    while True:
        scores, rows = faiss_index.search(text_embeds.numpy(), fetch)
        found = rows[0] >= 0
        scores, rows = scores[0][found], rows[0][found]
        positions = torch.from_numpy(np.unique(rows // frames)).long()
        exact = similarity(text_embeds, frame_embeds[positions])[0]  # (candidates,)
        order = exact.sort(descending=True, stable=True).indices[:n]
        if fetch >= count or len(scores) < fetch or (len(order) == n and exact[order[-1]] >= scores[-1]):
            return exact[order], positions[order]
        fetch = min(count, 4 * fetch)


class VideoIndex:
    """
    A video library index (see the module docstring). Open one with [`VideoIndex.open`], create or update it with
    [`VideoIndex.build`] / [`VideoIndex.add`], query it with [`VideoIndex.search`].

    Args:
        index_dir: the index folder (created by `add` if missing).
        model, processor: the model and processor; an existing index must have been built with the same ones.
        model_name: how to find the model again (a path or Hub id), recorded in the catalog; `None` for the embedded
            default.
        token_storage: how the chunks keep the stage-2 tokens, fixed when the index is created (one of
            `TOKEN_STORAGES`; None: the existing index's, or "float16" for a new one). "float16" keeps them as the
            tower computes them (0.92 MB a video for CLIP ViT-B/32 at 12 frames); "int8" with a scale per token
            (`video_store.quantize_tokens`, about half); "none" keeps none: indexing skips the stage-2 tower, and each
            search decodes and encodes the K videos it re-ranks (their files must still be there, unchanged).
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: CrossTVRModel,
        processor: CrossTVRProcessor,
        model_name: str | None = None,
        token_storage: str | None = None,
    ):
        if token_storage is not None and token_storage not in TOKEN_STORAGES:
            raise ValueError(f"token_storage={token_storage!r} is not one of {TOKEN_STORAGES}")
        self.index_dir = os.fspath(index_dir)
        self.model, self.processor = model, processor
        self.fingerprint = {"model": model_fingerprint(model), "processor": processor_fingerprint(processor)}
        catalog_path = IndexCatalog.path_in(self.index_dir)
        if not os.path.exists(catalog_path) and os.path.exists(os.path.join(self.index_dir, LEGACY_MANIFEST)):
            self._check(read_index_settings(self.index_dir))
            migrate_legacy_manifest(self.index_dir)
        os.makedirs(self.index_dir, exist_ok=True)
        self.catalog = IndexCatalog(catalog_path)
        self.catalog.create_settings(
            format_version=FORMAT_VERSION, model_name=model_name, **self.fingerprint, faiss=None, generation=0,
            token_storage=token_storage or "float16", dtype=_dtype_name(model),
        )
        settings = self.catalog.settings()
        self._check(settings)
        if settings["model"] != self.fingerprint["model"]:  # `_check` accepted the fingerprint of an earlier version
            with self.catalog.transaction() as connection:
                self.catalog.set_settings(connection, model=self.fingerprint["model"])
        self.token_storage = settings.get("token_storage", "float16")  # indexes from before the option: float16
        if token_storage is not None and token_storage != self.token_storage:
            raise IndexMismatchError(
                f"{self.index_dir} keeps its stage-2 tokens as {self.token_storage}, not {token_storage}; leave the "
                f"option out (or pass {self.token_storage}) to update it, or build a new index (a new --index folder)"
            )
        self._reader = ShardReader(os.path.join(self.index_dir, CHUNKS))
        self._generation, self._settings, self._embeds, self._faiss_index = None, None, None, None
        self._exact_embeddings = None  # IVF-PQ's memory-mapped float32 file

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        model: CrossTVRModel | None = None,
        processor: CrossTVRProcessor | None = None,
        device: str | torch.device | None = None,
        model_name: str | None = None,
    ) -> "VideoIndex":
        """Open an existing index. Unless a model is given, load `model_name` (default: the model the index was built
        with) in the precision the index was built in, on `device` (see `crosstvr.loading.resolve_device`)."""
        settings = read_index_settings(index_dir)
        if settings is None:
            raise FileNotFoundError(f"{os.fspath(index_dir)} is not a video index (no {CATALOG}); build one first")
        if model is None:
            name = settings["model_name"] if model_name is None else model_name
            model, processor = load_model(name, device=device, dtype=settings.get("dtype"))
        return cls(index_dir, model, processor, settings["model_name"])

    @classmethod
    def build(
        cls,
        video_dir: str | os.PathLike,
        index_dir: str | os.PathLike,
        model: CrossTVRModel,
        processor: CrossTVRProcessor,
        model_name: str | None = None,
        token_storage: str | None = None,
        **add_kwargs,
    ) -> "VideoIndex":
        """Create (or update) the index of `video_dir` in `index_dir` (`token_storage`: see the class); `add_kwargs`
        go to [`VideoIndex.add`]."""
        index = cls(index_dir, model, processor, model_name, token_storage)
        index.last_update = index.add(video_dir, **add_kwargs)
        return index

    def _check(self, settings: dict) -> None:
        if settings.get("format_version") not in (1, FORMAT_VERSION):  # 1: migrated on opening
            raise IndexMismatchError(
                f"{self.index_dir} has index format {settings.get('format_version')}, which this version of crosstvr "
                "cannot read; rebuild it (a new --index folder) or use the crosstvr version that built it"
            )
        if settings["processor"] != self.fingerprint["processor"]:
            raise IndexMismatchError(
                f"{self.index_dir} was indexed with other frame sampling or preprocessing; rebuild it with this "
                "processor or use the processor it was built with"
            )
        # Indexes built before fingerprints left out where the model was loaded from recorded it with that.
        same_model = settings["model"] == self.fingerprint["model"] or settings["model"] == model_fingerprint(
            self.model, with_name_or_path=True
        )
        if not same_model:
            recorded = settings.get("model_name") or "the embedded default model"
            dtype = settings.get("dtype", "float32")  # indexes from before the setting: float32
            if dtype != _dtype_name(self.model):
                raise IndexMismatchError(
                    f"{self.index_dir} was indexed with the model in {dtype}, and this one is in "
                    f"{_dtype_name(self.model)}; load it with dtype={dtype} (--dtype on the command line), or rebuild "
                    "the index (a new --index folder)"
                )
            raise IndexMismatchError(
                f"{self.index_dir} was indexed with another model ({recorded}); search it with that model, or "
                "rebuild the index (a new --index folder) for this one"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Indexing
    # ----------------------------------------------------------------------------------------------------------------

    def _merge_chunk(self, name: str) -> None:
        """Record a finished chunk (its JSON) in the catalog; each entry counts when its file is unchanged on disk."""
        with open(os.path.join(self.index_dir, CHUNKS, f"{name}.json"), encoding="utf-8") as file:
            record = json.load(file)
        videos = [(path, stat, row) for row, (path, stat) in enumerate(record["videos"]) if _unchanged(path, stat)]
        skipped = {path: (stat, reason) for path, (stat, reason) in record["skipped"].items()
                   if _unchanged(path, stat)}
        self.catalog.record_chunk(name, videos, skipped)

    def _merge_finished_chunks(self) -> None:
        """Record every finished chunk that the catalog does not know yet: from an interrupted run, or from the other
        processes."""
        chunk_dir = os.path.join(self.index_dir, CHUNKS)
        if not os.path.isdir(chunk_dir):
            return
        known = self.catalog.chunks()
        for name in sorted(os.listdir(chunk_dir)):
            if name.endswith(".json") and name[: -len(".json")] not in known:
                self._merge_chunk(name[: -len(".json")])

    def _delete_dead_chunks(self) -> None:
        dead = self.catalog.dead_chunks()
        for chunk in dead:
            self._reader.close(f"{chunk}.safetensors")
            for suffix in (".json", ".safetensors"):
                path = os.path.join(self.index_dir, CHUNKS, chunk + suffix)
                if os.path.exists(path):
                    os.remove(path)
        self.catalog.drop_chunks(dead)

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
        encoded (for a progress display other than the tqdm bar). Returns what changed: the counts `added`,
        `updated` and `removed` (their paths: [`changes`]), the files `skipped` (path -> reason), and the `total` of
        indexed videos.

        The library's listing and its comparison with the catalog live in the catalog's SQLite tables (see
        `crosstvr.index_catalog`), and each process reads one chunk of the plan at a time: memory does not grow with
        the library. Under `torchrun` / `accelerate launch` the main process lists and plans, and the processes
        share the chunks. One update at a time per index: two independent updates would share those tables (searches
        may run meanwhile).
        """
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        if faiss_index is not None and faiss_index not in FAISS_KINDS:
            raise ValueError(f"faiss_index={faiss_index!r} is not one of {FAISS_KINDS} or None")
        # Like `Accelerator`, honour ACCELERATE_USE_CPU: without it, PartialState under torchrun on a machine without
        # GPUs reports a single process, and every process would index every video.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        root = os.path.abspath(video_dir) + os.sep
        files = walk_videos(video_dir)  # every process: a missing folder is an error everywhere, not a hang
        if state.is_main_process:  # the catalog's one writer; the others wait, then read its plan
            self._merge_finished_chunks()
            self.catalog.plan_update(files, removes=lambda path: path.startswith(root) or not os.path.exists(path))
        state.wait_for_everyone()

        planned = self.catalog.planned_count()
        starts = range(0, planned, chunk_size)
        mine = starts[state.process_index :: state.num_processes]
        os.makedirs(os.path.join(self.index_dir, CHUNKS), exist_ok=True)
        total = sum(min(chunk_size, planned - start) for start in mine)
        bar = tqdm(total=total, desc="indexing", unit="video", disable=not (progress and state.is_local_main_process))
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            bar.update(count)
            if on_progress is not None:
                on_progress(done, total)

        for start in mine:
            chunk = self.catalog.planned(start, start + chunk_size)  # (path, [size, mtime_ns])
            name = _chunk_name(chunk)
            if os.path.exists(os.path.join(self.index_dir, CHUNKS, f"{name}.json")):
                advance(len(chunk))  # finished before an interruption
                continue
            files = dict(chunk)
            batches = []
            for batch in encode_videos(self.model, self.processor, list(files), batch_size, num_workers,
                                       self.token_storage):
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
            if state.is_main_process:
                self._merge_chunk(name)
        bar.close()

        state.wait_for_everyone()
        if state.is_main_process:
            self._merge_finished_chunks()
            self._delete_dead_chunks()
            self._rebuild_stage1_structures(faiss_index)
        state.wait_for_everyone()
        return {**self.catalog.change_counts(), "skipped": self.catalog.skipped_in_update(), "total": len(self)}

    def changes(self, kind: str) -> Iterator[str]:
        """The paths the last [`add`] "added", "updated" (re-encoded) or "removed", in path order, read from the
        catalog in batches (a first build of a million videos adds a million paths: they are not returned)."""
        if kind not in ("added", "updated", "removed"):
            raise ValueError(f"kind={kind!r} is not one of 'added', 'updated', 'removed'")
        return self.catalog.changes(kind)

    def _rebuild_stage1_structures(self, kind: str | None) -> None:
        """A new generation: the FAISS index of the stage-1 embeddings in path order (its own file), then, in one
        transaction, the positions renumbered in that order and the FAISS settings; then the old FAISS file goes."""
        faiss = _faiss()
        previous = self.catalog.settings().get("faiss")
        generation = self.catalog.generation() + 1
        info = None
        if kind is not None and faiss is None:
            logger.info("FAISS is not installed (pip install faiss-cpu): searches use an exact matrix product")
        if kind == "flat" and self.model.config.similarity_head != "mean":
            # A flat index of frames scans every frame as the exact product does, and may fetch in several rounds.
            logger.info("a frame-level similarity head searches a flat index as an exact matrix product")
            kind = None
        if kind is not None and faiss is not None and len(self):
            embeddings = self._gather_stage1(self.catalog.rows_in_order(by_path=True), len(self))
            frames = embeddings.shape[1] if embeddings.dim() == 3 else None
            if frames is not None:  # a frame-level head: one FAISS entry per frame, row = position * frames + frame
                embeddings = embeddings.flatten(0, 1)
            index, kind, params = build_faiss_index(embeddings.numpy(), kind)
            info = {"kind": kind, "params": params, "count": index.ntotal, "file": f"faiss-{generation}.index"}
            if frames is not None:
                info["frames"] = frames
            staging = os.path.join(self.index_dir, info["file"] + ".partial")
            faiss.write_index(index, staging)
            os.replace(staging, os.path.join(self.index_dir, info["file"]))
            if "shortlist" in params and frames is None:  # the exact embeddings IVF-PQ's shortlist is re-scored with
                info["embeddings_file"] = f"stage1-{generation}.f32"
                staging = os.path.join(self.index_dir, info["embeddings_file"] + ".partial")
                embeddings.float().numpy().tofile(staging)
                os.replace(staging, os.path.join(self.index_dir, info["embeddings_file"]))
        self.catalog.renumber(generation, faiss=info)
        for key in ("file", "embeddings_file"):
            if previous is not None and key in previous and os.path.exists(os.path.join(self.index_dir, previous[key])):
                os.remove(os.path.join(self.index_dir, previous[key]))

    # ----------------------------------------------------------------------------------------------------------------
    # Search
    # ----------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.catalog)

    def __contains__(self, path: str) -> bool:
        return path in self.catalog

    @property
    def settings(self) -> dict:
        """The index's settings: format version, model name and fingerprints, `faiss` (kind, parameters, file or
        None), `generation`, `updated` (seconds since the epoch)."""
        return self.catalog.settings()

    @property
    def paths(self) -> list[str]:
        """The indexed videos in position order (path order): the rows of [`stage1_embeddings`] and of the FAISS
        index. Reads every path; searches do not need it."""
        return [path for _, path, _, _ in self.catalog.rows_in_order()]

    def entry(self, path: str) -> dict | None:
        """`{"stat": [size, mtime_ns], "chunk", "row"}` of an indexed video, or None."""
        return self.catalog.entry(path)

    def _gather_stage1(self, rows, count: int) -> torch.Tensor:
        """`(count, projection_dim)` stage-1 embeddings of `rows` ((position, path, chunk, row)), chunk by chunk
        (`(count, frames, projection_dim)` with a frame-level similarity head); zeros where a position has no row (its
        video went while an update is under way)."""
        embeds = None
        by_chunk = {}
        for position, _, chunk, row in rows:
            by_chunk.setdefault(chunk, []).append((position, row))
        for chunk, pairs in by_chunk.items():
            chunk_embeds = self._reader.tensor(f"{chunk}.safetensors", "video_embeds")
            if embeds is None:
                embeds = torch.zeros(count, *chunk_embeds.shape[1:])
            positions, chunk_rows = zip(*pairs)
            embeds[list(positions)] = chunk_embeds[list(chunk_rows)].float()
        if embeds is None:
            return torch.zeros(count, *self.model.similarity_head.video_shape(self.model.config.num_frames))
        return embeds

    def _refresh(self) -> None:
        """Drop what was loaded for an older generation of the stage-1 structures."""
        generation = self.catalog.generation()
        if generation != self._generation:
            self._generation, self._settings = generation, self.catalog.settings()
            self._embeds, self._faiss_index, self._exact_embeddings = None, None, None

    def stage1_embeddings(self) -> torch.Tensor:
        """`(videos, projection_dim)` stage-1 embeddings of the indexed videos, in `paths` order (cached);
        `(videos, frames, projection_dim)` with a frame-level similarity head."""
        self._refresh()
        if self._embeds is None:
            self._embeds = self._gather_stage1(self.catalog.rows_in_order(), self.catalog.position_count())
        return self._embeds

    def _stage1_top(
        self, text_embeds: torch.Tensor, n: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best `n` videos by stage-1 similarity: `(scores (n,), positions (n,))`, FAISS (with `nprobe` lists
        probed or `ef_search` for this query instead of the index's settings) or exact."""
        faiss_info = self._settings.get("faiss")
        faiss = _faiss()
        if faiss_info is not None and faiss is not None:
            if self._faiss_index is None:
                self._faiss_index = faiss.read_index(os.path.join(self.index_dir, faiss_info["file"]))
            params = faiss_info["params"]
            if nprobe is not None and "nprobe" not in params:
                raise ValueError(f"nprobe applies to IVF indexes; the index in {self.index_dir} is {faiss_info['kind']}")
            if ef_search is not None and "efSearch" not in params:
                raise ValueError(f"ef_search applies to HNSW indexes; the index in {self.index_dir} is "
                                 f"{faiss_info['kind']}")
            if "nprobe" in params:
                self._faiss_index.nprobe = params["nprobe"] if nprobe is None else nprobe
            if "efSearch" in params:
                self._faiss_index.hnsw.efSearch = params["efSearch"] if ef_search is None else ef_search
            if "frames" in faiss_info:
                return search_frames(self._faiss_index, self.stage1_embeddings(), self.model.get_similarity,
                                     text_embeds.float(), n)
            query = text_embeds.float().numpy()
            scores, rows = self._faiss_index.search(query, max(n, params.get("shortlist", n)))
            scores, rows = scores[0][rows[0] >= 0], rows[0][rows[0] >= 0]
            if "embeddings_file" in faiss_info:
                if self._exact_embeddings is None:
                    self._exact_embeddings = np.memmap(
                        os.path.join(self.index_dir, faiss_info["embeddings_file"]),
                        dtype=np.float32,
                        mode="r",
                        shape=(faiss_info["count"], query.shape[1]),
                    )
                scores, rows = rescore_exactly(self._exact_embeddings, rows, query[0], n)
            return torch.from_numpy(scores), torch.from_numpy(rows).long()
        if nprobe is not None or ef_search is not None:
            raise ValueError(f"nprobe and ef_search apply to FAISS IVF / HNSW indexes; {self.index_dir} has none")
        similarity = self.model.get_similarity(text_embeds.float(), self.stage1_embeddings())[0]  # (videos,)
        order = similarity.sort(descending=True, stable=True).indices[:n]
        return similarity[order], order

    def _candidates(
        self, text_embeds: torch.Tensor, n: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[torch.Tensor, list[tuple[str, str, int]]]:
        """Stage 1's best `n`: scores and (path, chunk, row), from one generation of the stage-1 structures (an update
        that renumbers them between ranking and reading the rows makes this rank again). An IVF-PQ index built before
        the embeddings file existed (parameter `rescore`) has its shortlist (`rescore` times `n`) re-scored with the
        exact embeddings of the chunks."""
        for _ in range(3):
            self._refresh()
            faiss_info = self._settings.get("faiss")
            rescore = faiss_info["params"].get("rescore", 1) if faiss_info else 1
            scores, positions = self._stage1_top(text_embeds, min(n * rescore, len(self)), nprobe, ef_search)
            generation, rows = self.catalog.rows_at(positions.tolist())
            if generation != self._generation:
                continue
            keep = [i for i, row in enumerate(rows) if row is not None]  # videos removed by an update under way
            scores, rows = scores[keep], [rows[i] for i in keep]
            if rescore > 1:
                exact = torch.stack(
                    [self._reader.value(f"{chunk}.safetensors", "video_embeds", row) for _, chunk, row in rows]
                ).float() @ text_embeds[0].float()  # (shortlist,)
                order = exact.sort(descending=True, stable=True).indices[:n]
                scores, rows = exact[order], [rows[i] for i in order.tolist()]
            return scores, rows
        raise RuntimeError(f"the index in {self.index_dir} changed during three searches in a row; search again")

    def _stage2_tokens(self, entries: list[tuple[str, str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(vision_tokens (n, T, N, D), video_mask (n, T))` of `entries` ((path, chunk, row)): read from the chunks,
        or, with token storage "none", computed from the video files, which must be the ones that were indexed."""
        if self.token_storage != "none":
            cached = [self._reader.row(f"{chunk}.safetensors", row) for _, chunk, row in entries]
            return torch.stack([c["vision_tokens"] for c in cached]), torch.stack([c["video_mask"] for c in cached])
        paths = [path for path, _, _ in entries]
        for path in paths:
            entry = self.catalog.entry(path)
            if entry is None or not _unchanged(path, entry["stat"]):
                raise FileNotFoundError(
                    f"{path} is gone or changed since it was indexed, and this index keeps no stage-2 tokens "
                    "(token storage none) to re-rank it with; run `crosstvr index` on the library again"
                )
        inputs = self.processor(videos=paths)
        pixel_values, video_mask = inputs["pixel_values"].to(self.model.device), inputs["video_mask"]
        return self.model.get_vision_tokens(pixel_values, video_mask.to(self.model.device)).cpu(), video_mask

    @torch.no_grad()
    def search(
        self,
        query: str,
        k: int = 10,
        top_k_rerank: int | None = None,
        rerank: bool = True,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """
        The `k` best videos for `query`: the stage-1 top K (`top_k_rerank`, default the model's `rerank_top_k`)
        re-ranked by s_coarse + w * s_fine, then the next ones in stage-1 order. `rerank=False` gives stage 1 alone.
        The result's `stage1_hits` are stage 1's own top `k`, from the same pass. `nprobe` (IVF, IVF-PQ) and
        `ef_search` (HNSW) trade speed for recall in this search (default: the index's, in its settings).
        """
        if not len(self):
            raise ValueError(f"the index in {self.index_dir} holds no video")
        top_k = self.model.config.rerank_top_k if top_k_rerank is None else top_k_rerank
        text = self.processor(text=[query])
        text_embeds = self.model.get_text_features(
            text["input_ids"].to(self.model.device), text["attention_mask"].to(self.model.device)
        ).cpu()
        scores, entries = self._candidates(text_embeds, max(k, top_k if rerank else 0), nprobe, ef_search)
        candidates = [path for path, _, _ in entries]
        stage1_hits = [
            SearchHit(rank=i + 1, path=path, score=score, coarse_score=score, reranked=False)
            for i, (path, score) in enumerate(zip(candidates[:k], scores.tolist()))
        ]
        if not (rerank and top_k > 0):
            return SearchResult(query=query, hits=stage1_hits, stage1_hits=stage1_hits)
        # The candidates come in stage-1 order, so the K re-ranked are the first K; the rest follow them unchanged.
        head = entries[:top_k]
        vision_tokens, video_mask = self._stage2_tokens(head)
        reranked = self.model.rerank_text_to_video(
            scores[None, : len(head)],
            text["qformer_input_ids"],
            text["qformer_attention_mask"],
            vision_tokens,
            video_mask,
            top_k=top_k,
        )
        ranking = reranked.ranking[0].tolist() + list(range(len(head), len(entries)))
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
