"""Search results and finding video files."""

import os
from collections.abc import Iterator
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
    """All video files (by extension: mp4, avi, mkv, webm, mov) under `directory`, recursively, as absolute paths,
    sorted."""
    return sorted(path for path, _, _ in walk_videos(directory))


def walk_videos(directory: str | os.PathLike) -> Iterator[tuple[str, int, int]]:
    """
    The video files under `directory` (see [`find_videos`]) as `(absolute path, size, mtime_ns)`, one folder entry at
    a time and in no particular order: memory stays flat however many files a folder holds. Symbolic links to files
    are followed, links to folders are not (as `os.walk`), and links that lead nowhere are left out.

    Raises:
        NotADirectoryError: at once, not when iterated, if `directory` is not a folder.
    """
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"video folder {os.fspath(directory)!r} does not exist")
    return _walk_videos(os.path.abspath(directory))


def _walk_videos(directory: str) -> Iterator[tuple[str, int, int]]:
    folders = [directory]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.name.lower().endswith(VIDEO_EXTENSIONS) and entry.is_file():  # False for a broken link
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    yield entry.path, stat.st_size, stat.st_mtime_ns
