"""Push a CrossTVR checkpoint folder to the Hugging Face Hub, after checking that it loads from its own code.

    python hub_scripts/push_to_hub.py runs/stage2/final your-name/crosstvr-base \\
        [--private] [--revision BRANCH] [--commit-message "..."] [--token TOKEN]

Before anything is sent, the folder is loaded in a fresh Python process where the crosstvr package is not importable,
with `AutoConfig`, `AutoModel` and `AutoProcessor` and `trust_remote_code=True`, exactly as a user will load it. Then
`HfApi.upload_folder` uploads only the files that loading reads (configuration, safetensors weights, the three model
code files, processor and tokenizer files) and the model card, through its `allow_patterns`; training leftovers
(checkpoints, optimizer state, token caches, logs, pickles) never are. The token comes from `--token`, `HF_TOKEN` or
`hf auth login`.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap


# What a CrossTVR checkpoint folder needs to load, relative to the folder.
LOADABLE_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "configuration_crosstvr.py",
    "modeling_crosstvr.py",
    "processing_crosstvr.py",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "qformer_tokenizer/*",
    "README.md",
)

LOAD_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["crosstvr"] = None  # load from the folder's own code, as a Hub user does
    from transformers import AutoConfig, AutoModel, AutoProcessor
    folder = sys.argv[1]
    AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=["a test"])
    model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    """
)


class CheckpointLoadError(RuntimeError):
    """The folder does not load with its own code."""


def loadable_files(folder: str) -> list[str]:
    """The files of `folder` that `push` uploads, as POSIX paths relative to it, sorted (the selection
    `upload_folder` makes with `allow_patterns=LOADABLE_PATTERNS`)."""
    from huggingface_hub.utils import filter_repo_objects

    relative = [
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    ]
    return sorted(filter_repo_objects(relative, allow_patterns=list(LOADABLE_PATTERNS)))


def check_loads(folder: str) -> None:
    """Load `folder` in a fresh process without the crosstvr package; raise CheckpointLoadError with its output."""
    missing = [name for name in ("config.json", "modeling_crosstvr.py", "processor_config.json")
               if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise CheckpointLoadError(f"{folder} is not a CrossTVR checkpoint folder: {', '.join(missing)} missing")
    with tempfile.TemporaryDirectory() as modules:
        environment = {**os.environ, "HF_MODULES_CACHE": modules, "HF_HUB_OFFLINE": "1"}
        environment.pop("PYTHONPATH", None)
        result = subprocess.run(
            [sys.executable, "-c", LOAD_CHECK, os.path.abspath(folder)],
            cwd=modules,
            env=environment,
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise CheckpointLoadError(f"{folder} does not load with trust_remote_code=True:\n{result.stderr[-2000:]}")


def push(
    folder: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api=None,
):
    """Check that `folder` loads, then upload its loadable files; returns the commit info."""
    from huggingface_hub import HfApi

    check_loads(folder)
    files = loadable_files(folder)
    if "README.md" not in files:
        print("note: no README.md (model card) in the folder; generate one with hub_scripts/make_model_card.py")
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=list(LOADABLE_PATTERNS),
        commit_message=commit_message or f"Upload CrossTVR checkpoint ({len(files)} files)",
        revision=revision,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a CrossTVR checkpoint folder (save_pretrained of the model and processor)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/crosstvr-base")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    parser.add_argument("--commit-message", help="the commit message")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    args = parser.parse_args(argv)
    try:
        commit = push(args.folder, args.repo_id, args.private, args.revision, args.commit_message, args.token)
    except CheckpointLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {getattr(commit, 'commit_url', args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
