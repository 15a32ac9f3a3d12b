"""Search results and finding video files."""

import os
from dataclasses import dataclass


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


@dataclass
class SearchHit:
    """One video of a ranking: its final score (fused for the re-ranked ones), its stage-1 score and, for the
    re-ranked ones, its stage-2 score s_fine (`None` for the others)."""

    rank: int
    path: str
    score: float
    coarse_score: float
    reranked: bool
    fine_score: float | None = None


@dataclass
class SearchResult:
    query: str
    hits: list[SearchHit]


def find_videos(directory: str | os.PathLike) -> list[str]:
    """All video files (by extension: mp4, avi, mkv, webm, mov) under `directory`, recursively, sorted."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"video folder {os.fspath(directory)!r} does not exist")
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.lower().endswith(VIDEO_EXTENSIONS)
    )
