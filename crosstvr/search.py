"""Search results and finding video files."""

import os
from dataclasses import dataclass, field


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
    """The final ranking (`hits`) and, from the same stage-1 pass, stage 1's own top k (`stage1_hits`, equal to `hits`
    without re-ranking), so that what stage 2 changed can be shown."""

    query: str
    hits: list[SearchHit]
    stage1_hits: list[SearchHit] = field(default_factory=list)


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
