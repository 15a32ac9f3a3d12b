"""Assemble the search page (`app.py`) as a Hugging Face Space and push it.

    python hub_scripts/push_space.py your-name/crosstvr-search [--private] [--token TOKEN]
    python hub_scripts/push_space.py your-name/crosstvr-search --output DIR    # assemble only, push nothing

The Space holds `app.py`, a copy of the `crosstvr` package (with its embedded default model), a `requirements.txt`
with the package's dependencies as installed here plus Gradio, and a README whose front matter makes it a Gradio
Space. It runs the page on generated sample videos; link it from a model card with
`hub_scripts/make_model_card.py --space-id`. The token comes from `--token`, `HF_TOKEN` or `hf auth login`.
"""

import argparse
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPACE_README = """---
title: CrossTVR video search
emoji: 🎞️
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
---

# CrossTVR video search

Type a description of a video; stage 1 (a CLIP dual encoder) ranks the library and stage 2 (a frozen vision tower and
a Q-Former's decoupled spatial and temporal text attention) re-ranks the top K. The two orders are shown side by side.
The library is generated sample videos (two coloured shapes moving one after the other while a dot flashes) and the
model is the `crosstvr` package's embedded default, trained on such scenes: it finds a query's group of near
duplicates and barely tells them apart (see the package README, *The synthetic fine-grained benchmark*).
"""


def requirements() -> list[str]:
    """The installed crosstvr's runtime requirements (no extras), then Gradio for the page."""
    try:
        required = importlib.metadata.requires("crosstvr") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError("install the package first: pip install -e \".[app]\"") from error
    runtime = [line for line in required if "extra ==" not in line]
    gradio = [line.split(";")[0] for line in required if re.search(r"extra\s*==\s*['\"]app['\"]", line)]
    return runtime + gradio


def assemble(output: str) -> str:
    """Write the Space's files into `output` (created; must not exist) and return it."""
    import gradio

    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; give a new folder to assemble the Space in")
    staging = output.rstrip(os.sep) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "crosstvr"), os.path.join(staging, "crosstvr"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial"))
    shutil.copy(os.path.join(ROOT, "app.py"), staging)
    with open(os.path.join(staging, "requirements.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(requirements()) + "\n")
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as file:
        file.write(SPACE_README.format(gradio_version=gradio.__version__))
    os.replace(staging, output)
    return output


def push(space_id: str, private: bool = False, commit_message: str = "Upload the CrossTVR search page",
         token: str | None = None, api=None):
    """Assemble the Space in a temporary folder and upload it; returns the commit info."""
    from huggingface_hub import HfApi

    api = api if api is not None else HfApi(token=token)
    with tempfile.TemporaryDirectory() as work:
        folder = assemble(os.path.join(work, "space"))
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        return api.upload_folder(folder_path=folder, repo_id=space_id, repo_type="space", commit_message=commit_message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space_id", help="the Space to create or update, e.g. your-name/crosstvr-search")
    parser.add_argument("--output", help="only assemble the Space in this new folder; push nothing")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--commit-message", default="Upload the CrossTVR search page")
    args = parser.parse_args(argv)
    if args.output:
        print(f"Space assembled in {assemble(args.output)}")
        return 0
    push(args.space_id, args.private, args.commit_message, args.token)
    print(f"pushed to https://huggingface.co/spaces/{args.space_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
