"""`crosstvr serve`: a search page for a video index, as a Gradio app (`pip install -e ".[app]"`).

The page has a query box; the hits as thumbnails (rank, file, stage-1, fine and fused scores) in two orders side by
side, stage 1's and the re-ranked one, so that what stage 2 changed shows; controls for k, the re-ranking depth K and
re-ranking on or off; a player for the clicked hit; a status line (the index's model, its size, skipped files, when it
was last updated); and an action that brings the index up to date with the library folder (the resumable
[`VideoIndex.add`]) in the background, with progress, while searches go on.

[`LibraryService`] holds everything the page does, without Gradio, so that it is tested and reusable (for another
front end); [`build_app`] lays the page out over it. What the page can read is bounded by the service: only indexed
videos inside the library folder are ever returned (symbolic links resolved), and Gradio's file route is limited to
that folder (`allowed_paths`), with the index folder blocked.
"""

import hashlib
import html
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .index_catalog import IndexCatalog
from .indexing import IndexMismatchError, VideoIndex, index_exists, read_index_settings
from .loading import load_model
from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor, read_video
from .search import SearchHit, SearchResult


logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
THUMBNAIL_GRID = 2  # a thumbnail shows 2 x 2 frames spread over the video
THUMBNAIL_TILE = 80  # pixels per frame
MAX_RESULTS = 100


class LibraryError(ValueError):
    """A request the page cannot answer; the message says why and what to do, and is shown as it is."""


@dataclass
class Comparison:
    """One query's answers: the stage-1 order and the final one (re-ranked, or stage 1 again when re-ranking is off)."""

    stage1: SearchResult
    final: SearchResult
    reranked: bool


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies inside `folder` once both are resolved (symbolic links and `..` followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


class LibraryService:
    """
    Search, thumbnails, playback paths and background indexing over one video index; safe to call from several
    threads (Gradio answers requests concurrently).

    Args:
        index_dir: the index folder. It may not exist yet (then [`add_videos`] builds it) or may have been built with
            another model; the service then reports why in [`status`] and refuses searches, and keeps running.
        library_dir: the video folder the index covers: what [`add_videos`] indexes and the only place videos are
            served from. Default: the deepest folder holding every indexed video.
        model_name: the model (folder or Hub id); default: the one the index was built with (or the embedded default).
        model, processor: an already loaded model and processor (then `model_name` only labels them).
        device: where a model the service loads runs (`crosstvr.loading.resolve_device`; default: the GPU if there
            is one); it is loaded in the precision the index was built in.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        library_dir: str | os.PathLike | None = None,
        model_name: str | None = None,
        model: CrossTVRModel | None = None,
        processor: CrossTVRProcessor | None = None,
        device: str | torch.device | None = None,
    ):
        self.index_dir = os.path.abspath(os.fspath(index_dir))
        settings = read_index_settings(self.index_dir) or {}
        if model is None:
            model_name = model_name if model_name is not None else settings.get("model_name")
            model, processor = load_model(model_name, device=device, dtype=settings.get("dtype"))
        self.model, self.processor, self.model_name = model, processor, model_name
        if library_dir is None and os.path.exists(IndexCatalog.path_in(self.index_dir)):
            catalog = IndexCatalog(IndexCatalog.path_in(self.index_dir))
            library_dir = catalog.library_root()
            catalog.close()
        self.library_dir = None if library_dir is None else os.path.realpath(os.fspath(library_dir))
        self._lock = threading.Lock()  # guards the index swap
        self._adding = threading.Lock()  # one update of the index at a time
        self._thumbnail_dir = tempfile.TemporaryDirectory(prefix="crosstvr-thumbnails-")  # removed with the service
        self.index, self.problem = None, None
        self._open()

    # ------------------------------------------------------------------------------------------------------------
    # The index
    # ------------------------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """(Re)open the index folder, or record why it cannot be searched."""
        index, problem = None, None
        if not index_exists(self.index_dir):
            problem = f"There is no video index in {self.index_dir} yet. " + (
                f"Press \"Index the library\" to build it from {self.library_dir}."
                if self.library_dir
                else "Build one with `crosstvr index VIDEO_DIR --index INDEX_DIR`, or restart with --library VIDEO_DIR "
                "and build it from this page."
            )
        else:
            try:
                index = VideoIndex(self.index_dir, self.model, self.processor, self.model_name)
            except IndexMismatchError as error:
                problem = f"This index cannot be searched with the loaded model: {error}."
            else:
                if self.library_dir is None:
                    problem = f"The index in {self.index_dir} holds no video; restart with --library VIDEO_DIR."
                elif not len(index):
                    problem = f"The index holds no video yet. Press \"Index the library\" to index {self.library_dir}."
        with self._lock:
            self.index, self.problem = index, problem

    def status(self) -> str:
        """One line: the model, the library, how many videos are indexed and skipped, when the index last changed."""
        model = self.model_name or "the embedded default model"
        with self._lock:
            index, problem = self.index, self.problem
        if index is None:
            return f"Model: {model}. {problem}"
        changed = index.settings.get("updated")
        updated = "never" if changed is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(changed))
        skipped = index.catalog.skipped_count()
        line = (f"Model: {model} · library: {self.library_dir} · {len(index)} videos indexed, {skipped} skipped · "
                f"index updated {updated}")
        return line + (f" · {problem}" if problem else "")

    def _searchable(self) -> VideoIndex:
        with self._lock:
            index, problem = self.index, self.problem
        if index is None or problem:
            raise LibraryError(problem)
        return index

    def add_videos(self, on_progress=None) -> str:
        """
        Bring the index up to date with the library folder (new, changed and deleted videos; resumable) on a separate
        [`VideoIndex`], then switch searches over to it; searches meanwhile use the index as it was. Returns a summary.
        `on_progress(done, total)` follows the encoding.
        """
        if self.library_dir is None:
            raise LibraryError("No library folder is known; restart with --library VIDEO_DIR.")
        if not os.path.isdir(self.library_dir):
            raise LibraryError(f"The library folder {self.library_dir} does not exist any more.")
        if not self._adding.acquire(blocking=False):
            raise LibraryError("The library is already being indexed; wait for that to finish.")
        try:
            try:
                updater = VideoIndex(self.index_dir, self.model, self.processor, self.model_name)
            except IndexMismatchError as error:
                raise LibraryError(f"This index cannot be updated with the loaded model: {error}.") from error
            # Decoding in this process: DataLoader workers would be forked from a threaded server.
            update = updater.add(self.library_dir, num_workers=0, progress=False, on_progress=on_progress)
            self._open()
        finally:
            self._adding.release()
        summary = (f"Indexed {update['total']} videos: {update['added']} added, {update['updated']} "
                   f"re-encoded, {update['removed']} removed.")
        if update["skipped"]:
            skipped = (f"{os.path.basename(path)} ({why})" for path, why in update["skipped"].items())
            summary += " Skipped: " + "; ".join(skipped)
        return summary

    # ------------------------------------------------------------------------------------------------------------
    # Search and media
    # ------------------------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, top_k: int | None = None, rerank: bool = True) -> Comparison:
        """The `k` best videos for `query` in stage 1's order and in the final order (re-ranking the top `top_k`)."""
        index = self._searchable()
        query = (query or "").strip()
        if not query:
            raise LibraryError("Type a query: a description of the video you are looking for.")
        size = len(index)
        if not 1 <= k <= MAX_RESULTS:
            raise LibraryError(f"k = {k}: ask for between 1 and {MAX_RESULTS} results.")
        top_k = self.model.config.rerank_top_k if top_k is None else top_k
        if rerank and not 1 <= top_k <= size:
            raise LibraryError(f"K = {top_k}: the re-ranking depth must be between 1 and the library's {size} videos.")
        k = min(k, size)
        try:
            result = index.search(query, k=k, top_k_rerank=top_k, rerank=rerank)
        except FileNotFoundError as error:
            with self._lock:
                replaced = self.index is not index
            if not replaced:
                raise LibraryError(f"A file of the index is missing ({error.filename}); rebuild the index.") from error
            # An update finished between opening the index and reading its chunks: search the new one.
            return self.search(query, k, top_k, rerank)
        return Comparison(stage1=SearchResult(query, result.stage1_hits), final=result, reranked=rerank)

    def resolve(self, path: str) -> str:
        """`path` if it is an indexed video inside the library folder (links resolved); otherwise a refusal."""
        index = self._searchable()
        if self.library_dir is None or not _inside(path, self.library_dir) or path not in index:
            raise LibraryError("Only indexed videos of the library can be shown.")
        return path

    def thumbnail(self, path: str) -> str:
        """
        A picture file of `THUMBNAIL_GRID`² frames of an indexed video spread over its duration, tiled row by row.
        Written once per version of the video, atomically: Gradio serves files while other requests may be asking for
        the same thumbnail (its own caching of in-memory images rewrites a file in place, which concurrent readers see
        truncated).
        """
        from PIL import Image

        path = self.resolve(path)
        stat = os.stat(path)
        name = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        target = os.path.join(self._thumbnail_dir.name, f"{name}.png")
        if os.path.exists(target):
            return target
        tile = (THUMBNAIL_TILE, THUMBNAIL_TILE)
        try:
            frames = [np.asarray(Image.fromarray(f).resize(tile)) for f in read_video(path, THUMBNAIL_GRID**2)]
        except (OSError, ValueError) as error:
            logger.warning("no thumbnail for %s: %s", path, error)
            frames = []
        frames += [np.full((*tile, 3), 200, dtype=np.uint8)] * (THUMBNAIL_GRID**2 - len(frames))  # short videos
        rows = [np.concatenate(frames[i : i + THUMBNAIL_GRID], axis=1) for i in range(0, len(frames), THUMBNAIL_GRID)]
        grid = np.concatenate(rows, axis=0)  # (GRID * TILE, GRID * TILE, 3)
        with tempfile.NamedTemporaryFile(dir=self._thumbnail_dir.name, suffix=".partial.png", delete=False) as file:
            Image.fromarray(grid).save(file, format="PNG")
        os.replace(file.name, target)
        return target

    def display_name(self, path: str) -> str:
        return os.path.relpath(path, self.library_dir) if self.library_dir else os.path.basename(path)


def _format_score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fused_score(hit: SearchHit) -> str:
    return _format_score(hit.score if hit.reranked else None)


def gallery_items(service: LibraryService, result: SearchResult) -> list[tuple[str, str]]:
    """Thumbnails with captions: rank, file, and the stage-1 / fine / fused scores."""
    return [
        (
            service.thumbnail(hit.path),
            f"{hit.rank}. {service.display_name(hit.path)} · stage 1 {hit.coarse_score:.3f} · fine "
            f"{_format_score(hit.fine_score)} · fused {_fused_score(hit)}",
        )
        for hit in result.hits
    ]


def results_table(service: LibraryService, comparison: Comparison) -> str:
    """An HTML table of the final order, with each video's stage-1 rank beside its new one (arrow: moved up/down)."""
    stage1_rank = {hit.path: hit.rank for hit in comparison.stage1.hits}
    rows = []
    for hit in comparison.final.hits:
        before = stage1_rank.get(hit.path)
        if before is None:
            before = f"below {len(comparison.stage1.hits)}"
        elif before != hit.rank:
            before = f"{before} {'↑' if before > hit.rank else '↓'}"
        cells = (hit.rank, service.display_name(hit.path), before, f"{hit.coarse_score:.4f}",
                 _format_score(hit.fine_score), _fused_score(hit))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    header = "".join(f"<th>{name}</th>" for name in ("rank", "video", "stage-1 rank", "stage-1", "fine", "fused"))
    return f'<table id="results-table"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


SEARCH_CONCURRENCY = 4  # searches answered at once; more wait in Gradio's queue
QUEUE_SIZE = 64  # waiting requests beyond which Gradio answers "busy"


def _import_gradio():
    try:
        import gradio
    except ImportError as error:
        raise ImportError('The search page needs Gradio: pip install -e ".[app]" (in a clone of crosstvr).') from error
    return gradio


def build_app(service: LibraryService):
    """The search page over `service`, as a `gradio.Blocks` (not launched)."""
    gr = _import_gradio()
    default_depth = service.model.config.rerank_top_k

    def run_search(query, k, top_k, rerank):
        try:
            comparison = service.search(query, int(k), int(top_k), bool(rerank))
        except LibraryError as error:
            return [], [], "", f"**{error}**", [], []
        final, stage1 = comparison.final.hits, comparison.stage1.hits
        how = f"the top {int(top_k)} re-ranked by stage 2" if rerank else "stage 1 only (re-ranking is off)"
        message = f"{len(final)} results for “{html.escape(comparison.final.query)}”: {how}."
        return (gallery_items(service, comparison.final), gallery_items(service, comparison.stage1),
                results_table(service, comparison), message, [h.path for h in final], [h.path for h in stage1])

    def play(paths, event: gr.SelectData):
        try:
            path = service.resolve(paths[event.index])
        except (LibraryError, IndexError, TypeError) as error:
            return None, f"**{error if isinstance(error, LibraryError) else 'No such result.'}**"
        return path, f"Playing {html.escape(service.display_name(path))}"

    def add_videos(progress=gr.Progress()):
        def report(done, total):
            progress((done, total), desc="indexing", unit="videos")

        try:
            summary = service.add_videos(on_progress=report)
        except LibraryError as error:
            summary = f"**{error}**"
        return summary, service.status()

    with gr.Blocks(title="CrossTVR video search", analytics_enabled=False) as app:
        gr.Markdown("# CrossTVR video search\nDescribe a video; stage 1 ranks the library, stage 2 re-ranks the top K.")
        status = gr.Markdown(service.status(), elem_id="status")
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="big red circle goes left, then ...", elem_id="query",
                               scale=5)
            search = gr.Button("Search", variant="primary", elem_id="search", scale=1)
        with gr.Row():
            k = gr.Slider(1, MAX_RESULTS, value=10, step=1, label="results (k)", elem_id="k")
            top_k = gr.Slider(1, MAX_RESULTS, value=default_depth, step=1, label="re-ranking depth (K)",
                              elem_id="depth")
            rerank = gr.Checkbox(value=True, label="re-rank with stage 2", elem_id="rerank")
        message = gr.Markdown(elem_id="message")
        with gr.Row():
            final = gr.Gallery(label="Re-ranked order (fused score)", columns=3, object_fit="contain",
                               elem_id="final", allow_preview=False)
            stage1 = gr.Gallery(label="Stage-1 order (cosine)", columns=3, object_fit="contain",
                                elem_id="stage1", allow_preview=False)
        table = gr.HTML(elem_id="results")
        with gr.Row():
            player = gr.Video(label="Click a result to play it", interactive=False, elem_id="player")
            playing = gr.Markdown(elem_id="playing")
        with gr.Accordion("Library", open=False):
            add = gr.Button(f"Index the library ({service.library_dir or 'unknown folder'})", elem_id="add")
            added = gr.Markdown(elem_id="added")
        final_paths, stage1_paths = gr.State([]), gr.State([])

        outputs = [final, stage1, table, message, final_paths, stage1_paths]
        gr.on([search.click, query.submit], run_search, [query, k, top_k, rerank], outputs, concurrency_id="search",
              api_name="search")
        final.select(play, final_paths, [player, playing], concurrency_id="search", api_name=False)
        stage1.select(play, stage1_paths, [player, playing], concurrency_id="search", api_name=False)
        add.click(add_videos, None, [added, status], concurrency_limit=1, concurrency_id="add", api_name="add_videos")
        app.load(service.status, None, status, api_name=False)
    return app


def serve(service: LibraryService, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """
    Launch the page on `host:port` (loopback unless told otherwise; a warning says when it is not). Gradio may only
    serve files from the library folder, never from the index folder. With `block=False`, returns
    `(app, local_url)` with the server running in a thread (`app.close()` stops it).
    """
    app = build_app(service)
    app.queue(default_concurrency_limit=SEARCH_CONCURRENCY, max_size=QUEUE_SIZE)
    if host not in LOOPBACK_HOSTS:
        logger.warning("serving on %s: anyone who can reach this machine on that address can search the library "
                       "and play its videos", host)
    _, local_url, _ = app.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[service.library_dir] if service.library_dir else None,
        blocked_paths=[service.index_dir],
        prevent_thread_lock=not block,
        ssr_mode=False,
        quiet=not block,
    )
    return app, local_url
