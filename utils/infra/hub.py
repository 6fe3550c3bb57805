"""Model cards and Hub pushes, shared by every script; nothing here knows a method or a model family."""

import os

from huggingface_hub import (
    ModelCard,
    ModelCardData,
    create_repo,
    get_token,
    upload_folder,
    whoami,
)
from huggingface_hub.utils import filter_repo_objects

from .errors import UserError
from .outputs import MARKER, check_finite_model

# Never uploaded with a model: resumable training state, logs, the memory bank (a dataset of its own, see
# utils.methods.memory_bank.push_memory_bank), anything half-written and the output-folder marker.
UPLOAD_IGNORE = ["checkpoint-*", "logs/*", "memory_bank/*", "*.partial/*", "*.tmp/*", ".*.tmp-*", MARKER]


def hub_repo_id(hub_model_id: str | None, output_dir: str, push: bool = False, token: str | None = None) -> str:
    """Where a user loads the output from, as a card's usage line names it. Pushed (`push`): --hub_model_id, else
    the output folder's name (the diffusers examples' rule), under the token's user when it has no namespace (what
    `create_repo` makes of it; one whoami call, only when pushing). Not pushed: --hub_model_id where given, else the
    output folder as given (it loads from there)."""
    if not push:
        return hub_model_id or output_dir
    name = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    return name if "/" in name else f"{whoami(token=resolve_token(token))['name']}/{name}"


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


def hub_base_model(name: str) -> str | None:
    """`base_model` as the Hub accepts it in card metadata: a Hub id as given; a local snapshot of the Hub cache
    (`.../models--org--name/snapshots/<revision>`) as `org/name`; any other local folder: None (left out: the Hub
    refuses a local path at upload, after the whole training)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = os.path.expanduser(name)
    if os.path.exists(path):
        parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
        cached = [p for p in parts if p.startswith("models--")]
        name = cached[-1][len("models--"):].replace("--", "/") if cached else None
    if name is None:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_license(name: str) -> str | None:
    """The license in the base model's card (a local folder's README.md, or the Hub's when reachable)."""
    try:
        path = os.path.join(name, "README.md")
        return (ModelCard.load(path) if os.path.exists(path) else ModelCard.load(name)).data.license
    except Exception:  # offline, no card, no metadata: the card then says nothing about the license
        return None


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
    image_heading: str = "Samples",
    license: str | None = None,
    library_name: str = "diffusers",
    pipeline_tag: str | None = None,
    instance_prompt: str | None = None,
    widget: list[dict] | None = None,
) -> ModelCard:
    """Write `README.md` with the Hub's metadata (`library_name`: diffusers, transformers...; `pipeline_tag`: the
    Hub task, e.g. image-classification) and a body that says what was trained and how to load it (`image` shown
    under `image_heading`). As diffusers' training scripts' `save_model_card`: `instance_prompt` (DreamBooth's
    trigger words, in the metadata and a "Trigger words" section), `widget` (the Hub's gallery: [{"text": prompt,
    "output": {"url": file}}], shown by `<Gallery />`) and the tags through diffusers' `populate_model_card`."""
    data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        base_model=hub_base_model(base_model),
        tags=sorted(set(tags) | ({"diffusers-training"} if library_name == "diffusers" else set())),
        datasets=datasets or None,
        license=license,
        instance_prompt=instance_prompt,
        widget=widget or None,
    )
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters.items())
    body = [f"# {title}", ""] + (["<Gallery />", ""] if widget else []) + [description, ""]
    if instance_prompt:
        body += ["## Trigger words", "", f"You should use `{instance_prompt}` to trigger the image generation.", ""]
    body += ["## Training hyper-parameters", "", "| name | value |", "|---|---|", rows]
    if metrics:
        body += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v} |" for k, v in metrics.items()]
    if image:
        body += ["", f"## {image_heading}", "", f"![{image_heading.lower()}]({image})"]
    body += ["", "## Usage", "", "```python", usage.strip(), "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    card = ModelCard(content)
    if library_name == "diffusers":
        from diffusers.utils.hub_utils import populate_model_card

        card.data.tags = None  # populate_model_card appends the tags (and library_name) as diffusers' scripts do
        card = populate_model_card(card, tags=data.tags)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def save_training_card(output_dir: str, *, base_model: str, dataset: str, last_logs: dict, metrics: dict = None,
                       image: str | None = "samples.png", **card) -> ModelCard:
    """The card of a training script's output: the dataset when it is a Hub id, the base model's license,
    `metrics` and the last step's losses, the sample `image`; `card` gives the title, tags, description,
    hyper-parameters and usage (and `library_name`)."""
    return save_model_card(
        output_dir, base_model=base_model,
        datasets=[dataset] if not os.path.exists(dataset) else None,
        license=base_model_license(base_model),
        metrics={**(metrics or {}),
                 **{f"last-step training {k}": f"{v:.4f}" for k, v in last_logs.items() if k.startswith("loss")}},
        image=image, **card)


def push_folder(output_dir: str, repo_id: str, token: str | None, private: bool = False) -> str:
    """Create the repo if needed and upload the output folder, without checkpoints and logs. Returns the repo id.
    A folder whose uploaded weights hold a NaN or an infinity is refused before anything is sent."""
    uploaded = filter_repo_objects(
        (os.path.relpath(os.path.join(d, f), output_dir) for d, _, fs in os.walk(output_dir) for f in fs),
        ignore_patterns=UPLOAD_IGNORE)
    check_finite_model(output_dir, f"push of {output_dir}",
                       [os.path.join(output_dir, f) for f in uploaded if f.endswith(".safetensors")])
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
