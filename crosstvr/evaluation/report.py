"""The paper-style results table and the results JSON file (which the model-card generator reads)."""

import json
import os
import tempfile
from dataclasses import asdict

from .evaluator import RetrievalEvaluation


COLUMNS = ("R1", "R5", "R10", "MdR", "MnR")
HEADERS = ("R@1", "R@5", "R@10", "MdR", "MnR")
ROW_NAMES = {"stage1": "stage 1", "two_stage": "CrossTVR (two-stage)"}


def format_table(evaluation: RetrievalEvaluation) -> str:
    """Rows: stage 1 and, when re-ranked, the two stages; columns: R@1, R@5, R@10, MdR, MnR of both directions."""
    name_width = max(len(name) for name in ROW_NAMES.values()) + 2
    cells = "".join(f"{header:>7}" for header in HEADERS)
    lines = [
        f"{'':<{name_width}}{'text-to-video':^35}   {'video-to-text':^35}",
        f"{'':<{name_width}}{cells}   {cells}",
    ]
    for key, name in ROW_NAMES.items():
        metrics = evaluation.metrics.get(key)
        if metrics is None:
            continue
        directions = [
            "".join(f"{metrics[f'{prefix}_{column}']:>7.1f}" for column in COLUMNS) for prefix in ("t2v", "v2t")
        ]
        lines.append(f"{name:<{name_width}}{directions[0]}   {directions[1]}")
    notes = [f"{evaluation.num_texts} texts, {evaluation.num_videos} videos"]
    if evaluation.top_k is not None:
        notes.append(f"re-ranking depth K = {evaluation.top_k}, w = {evaluation.fine_score_weight:g}")
    if evaluation.post_processing is not None:
        notes.append(f"post-processing: {evaluation.post_processing}")
    return "\n".join(lines + ["; ".join(notes)])


def write_results(path: str | os.PathLike, evaluation: RetrievalEvaluation, **context) -> None:
    """Write the evaluation and `context` (model, dataset, split, ...) as JSON, atomically (temp file + rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {**context, **asdict(evaluation)}
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".partial", delete=False, encoding="utf-8") as file:
        json.dump(payload, file, indent=2)
        staging = file.name
    os.replace(staging, path)


def read_results(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)
