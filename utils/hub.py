"""Model cards and Hub pushes, shared by every script."""

import os

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub import get_token, whoami

from .errors import UserError

# Never uploaded: resumable training state, logs, memory-bank shards in progress.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", "*.partial/**", "*.tmp/**"]


def resolve_token(token: str | None) -> str | None:
    """--hub_token, else HF_TOKEN, else the cached `hf auth login` token."""
    return token or get_token()


def check_hub_access(token: str | None) -> str:
    """Fail before training, in one sentence, when a push at the end could not work. Returns the user name."""
    token = resolve_token(token)
    if token is None:
        raise UserError("--push_to_hub needs a token: pass --hub_token, set HF_TOKEN or run `hf auth login`")
    try:
        return whoami(token=token)["name"]
    except Exception as e:
        raise UserError(f"--push_to_hub: the Hub did not accept the token or could not be reached ({type(e).__name__})")


def save_model_card(
    output_dir: str,
    *,
    title: str,
    base_model: str,
    tags: list[str],
    description: str,
    hyperparameters: dict,
    usage: str,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    image: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Write `README.md` with diffusers-style metadata and a body that says what was trained and how to load it."""
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=sorted(set(tags) | {"diffusers-training"}),
        datasets=datasets or None,
        license=license,
    )
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters.items())
    body = [f"# {title}", "", description, "", "## Training hyper-parameters", "", "| name | value |", "|---|---|", rows]
    if metrics:
        body += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v} |" for k, v in metrics.items()]
    if image:
        body += ["", "## Samples", "", f"![samples]({image})"]
    body += ["", "## Usage", "", "```python", usage.strip(), "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    card = ModelCard(content)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def push_folder(output_dir: str, repo_id: str, token: str | None, private: bool = False) -> str:
    """Create the repo if needed and upload the output folder, without checkpoints and logs. Returns the repo id."""
    token = resolve_token(token)
    repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="Upload trained model",
        ignore_patterns=UPLOAD_IGNORE,
        token=token,
    )
    return repo_id
