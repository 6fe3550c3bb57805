"""Bi-tuning: the vectorised method against a literal port of the reference loops, the heads on real transformers
classifiers, the method objects (one call shape for Bi-tuning and its baselines), and train_bi_tuning.py end to end
(stock outputs, resume, two processes, bad inputs)."""

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    BertConfig,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    Dinov2Config,
    Dinov2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import train_bi_tuning as script
from fixtures.in_process import run_script
from fixtures.testing import ROOT, cli_error, cli_help, killed_at_first_checkpoint, run_main
from utils.families.image_classifiers import find_head, replace_head
from utils.infra.data import per_class_subset, stratified_split
from utils.infra.errors import UserError
from utils.methods.bi_tuning import (
    METHODS,
    BiTuning,
    BiTuningLoss,
    ClassQueues,
    CrossEntropy,
    Features,
    TwoHeadClassifier,
    classifier_contrast_logits,
    contrastive_target,
    head_directions,
    key_encoder,
    make_method,
    momentum_update,
    projector_logits,
)

FAST = ["--train_batch_size", "8", "--max_train_steps", "4", "--validation_steps", "0", "--checkpointing_steps", "100",
        "--report_to", "none", "--queue_size", "4", "--projection_dim", "8", "--per_device_eval_batch_size", "32"]


def tiny_classifiers():
    """(name, model, processor) for a tiny ResNet, ViT and ConvNeXt at 16x16."""
    torch.manual_seed(0)
    return [
        ("resnet", ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                             num_labels=3)),
         ConvNextImageProcessor(size={"shortest_edge": 16})),
        ("vit", ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, image_size=16, patch_size=4, num_labels=3)),
         ViTImageProcessor(size={"height": 16, "width": 16})),
        ("convnext", ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                                   num_labels=3)),
         ConvNextImageProcessor(size={"shortest_edge": 16})),
        ("swin", SwinForImageClassification(SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1],
                                                       num_heads=[1, 2], window_size=2, num_labels=3)),
         ViTImageProcessor(size={"height": 16, "width": 16})),
        ("dinov2", Dinov2ForImageClassification(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=32, image_size=16, patch_size=4,
                                                             num_labels=3)),  # head on [CLS, mean patch]: 32
         ViTImageProcessor(size={"height": 16, "width": 16})),
    ]


@pytest.fixture(scope="session")
def classifier_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    for name, model, processor in tiny_classifiers():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return {name: str(root / name) for name in ("resnet", "vit", "convnext", "swin", "dinov2")}


def train(model_dir, data_dir, out, *extra):
    return run_main(script, model_dir, data_dir, out, *FAST, *extra)


# ---------------------------------------------------------------------------------------------------------------
# The method against a literal port of the reference's per-sample loops (tllib/regularization/bi_tuning.py).

def reference_step(z_q, z_k, hn_q, hn_k, labels, w, queue_h, queue_z, ptr, K, T):
    """The reference's forward, one sample at a time, on queues laid out as ours (C, K, dim). Returns
    (logits_z, logits_y, queue_h, queue_z, ptr) with the queues updated."""
    queue_h, queue_z, ptr = queue_h.clone(), queue_z.clone(), ptr.clone()
    C = queue_h.shape[0]
    before_z = queue_z.clone()
    rows_z = []
    for i in range(len(labels)):
        c = int(labels[i])
        pos = before_z[c]  # K x D
        neg = torch.cat([before_z[:c], before_z[c + 1:]]).reshape(-1, before_z.shape[-1])
        rows_z.append(torch.cat([(z_q[i] * z_k[i]).sum()[None], pos @ z_q[i], neg @ z_q[i]]))
        p = int(ptr[c])
        queue_h[c, p], queue_z[c, p] = hn_k[i], z_k[i]
        ptr[c] = (p + 1) % K
    rows_y = []
    for i in range(len(labels)):
        c = int(labels[i])
        pos = queue_h[c] @ w[c]
        neg = torch.cat([queue_h[:c], queue_h[c + 1:]]).reshape(-1, queue_h.shape[-1]) @ w[c]
        rows_y.append(torch.cat([(hn_q[i] * w[c]).sum()[None], pos, neg]))
    assert len(rows_y[0]) == 1 + C * K
    return torch.stack(rows_z) / T, torch.stack(rows_y) / T, queue_h, queue_z, ptr


def unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("K,labels", [
    (4, [0, 2, 1, 0, 0, 2]),  # fewer than K per class
    (3, [1, 1, 1, 1, 1, 0, 1, 2, 1]),  # 7 keys of class 1 > K: the ring wraps within the batch
])
def test_vectorised_logits_and_queues_equal_the_reference_loops(K, labels):
    g = torch.Generator().manual_seed(0)
    C, F1, D, T = 3, 6, 5, 0.07
    labels = torch.tensor(labels)
    n = len(labels)
    queues = ClassQueues(C, K, F1 - 1, D, g)
    queues.ptr.copy_(torch.tensor([1, K - 1, 0]))  # rings already part-way round
    z_q, z_k, hn_q, hn_k, w = unit(n, D, g=g), unit(n, D, g=g), unit(n, F1, g=g), unit(n, F1, g=g), unit(C, F1, g=g)
    ref_z, ref_y, ref_h, ref_qz, ref_ptr = reference_step(z_q, z_k, hn_q, hn_k, labels, w, queues.h, queues.z,
                                                          queues.ptr, K, T)
    ours_z = projector_logits(z_q, z_k, queues.z, labels, T)
    queues.enqueue(hn_k, z_k, labels)
    ours_y = classifier_contrast_logits(hn_q, w, queues.h, labels, T)
    torch.testing.assert_close(ours_z, ref_z)
    torch.testing.assert_close(ours_y, ref_y)
    assert torch.equal(queues.h, ref_h) and torch.equal(queues.z, ref_qz) and torch.equal(queues.ptr, ref_ptr)


def test_loss_equals_cross_entropy_plus_both_kl_terms_and_the_target_is_uniform_on_positives():
    g = torch.Generator().manual_seed(1)
    C, K, F1, D, T = 4, 5, 7, 3, 0.1
    labels = torch.tensor([0, 3, 3, 1])
    head = torch.nn.Linear(F1 - 1, C)
    q = Features(torch.randn(4, C, generator=g), None, unit(4, D, g=g), unit(4, F1, g=g))
    k = Features(None, None, unit(4, D, g=g), unit(4, F1, g=g))
    queues = ClassQueues(C, K, F1 - 1, D, g)
    snapshot = ClassQueues(C, K, F1 - 1, D)
    snapshot.load_state_dict(queues.state_dict())
    loss, parts = BiTuningLoss(T, 0.3, 2.0)(q, k, labels, head, queues)
    target = contrastive_target(4, C, K)
    assert torch.allclose(target.sum(1), torch.ones(4)) and (target[:, K + 1:] == 0).all()
    logits_z = projector_logits(q.z, k.z, snapshot.z, labels, T)
    snapshot.enqueue(k.hn, k.z, labels)
    logits_y = classifier_contrast_logits(q.hn, head_directions(head), snapshot.h, labels, T)
    kl = [(target[:, :K + 1] * (target[:, :K + 1].log() - F.log_softmax(x, 1)[:, :K + 1])).sum(1).mean()
          for x in (logits_z, logits_y)]
    torch.testing.assert_close(parts["loss_projector"], kl[0])
    torch.testing.assert_close(parts["loss_classifier_contrast"], kl[1])
    torch.testing.assert_close(loss, F.cross_entropy(q.logits, labels) + 0.3 * kl[0] + 2.0 * kl[1])


@pytest.mark.parametrize("name", ["resnet", "vit", "convnext", "swin", "dinov2"])
def test_head_of_the_features_is_the_logits_and_only_cross_entropy_trains_the_head(name):
    _, classifier, _ = next(c for c in tiny_classifiers() if c[0] == name)
    path = find_head(classifier, (16, 16))
    head = replace_head(classifier, path, 5)
    weight, bias = head.weight.detach(), head.bias.detach()
    assert head.out_features == 5 and float(bias.abs().max()) == 0 and 0.005 < float(weight.std()) < 0.02
    model = TwoHeadClassifier(classifier, path, 8).train()
    x = torch.randn(6, 3, 16, 16)
    out = model(x)
    assert out.logits.shape == (6, 5)
    torch.testing.assert_close(model.head(out.h), out.logits)
    torch.testing.assert_close(out.hn, F.normalize(torch.cat([out.h, torch.ones(6, 1)], 1), dim=1))

    keys = key_encoder(model)
    queues = ClassQueues(5, 3, head.in_features, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    _, parts = BiTuningLoss()(out, keys(torch.randn(6, 3, 16, 16)), labels, model.head, queues)
    grads = {}
    for part in ("loss_projector", "loss_classifier_contrast", "loss_ce"):
        model.zero_grad(set_to_none=True)
        parts[part].backward(retain_graph=True)
        grads[part] = (model.head.weight.grad, next(classifier.parameters()).grad)
    assert grads["loss_classifier_contrast"][0] is None and grads["loss_projector"][0] is None  # no head gradient
    assert grads["loss_classifier_contrast"][1].abs().sum() > 0  # ...but it trains the backbone
    assert grads["loss_ce"][0].abs().sum() > 0


def test_momentum_zero_copies_the_query_and_one_keeps_the_keys():
    query = torch.nn.Linear(3, 2)
    keys = key_encoder(query)
    assert all(not p.requires_grad for p in keys.parameters())
    with torch.no_grad():
        query.weight.add_(1.0)
    before = keys.weight.clone()
    momentum_update(keys, query, 1.0)
    assert torch.equal(keys.weight, before)
    momentum_update(keys, query, 0.0)
    assert torch.equal(keys.weight, query.weight)
    with torch.no_grad():
        query.weight.add_(1.0)
    momentum_update(keys, query, 0.75)
    torch.testing.assert_close(keys.weight, 0.75 * (query.weight - 1.0) + 0.25 * query.weight)


def tiny_method(name, **bi_tuning):
    """`make_method(name)` around a fresh tiny ResNet with a new 4-class head (seeded: the same weights each call)."""
    _, classifier, _ = next(c for c in tiny_classifiers() if c[0] == "resnet")
    path = find_head(classifier, (16, 16))
    replace_head(classifier, path, 4)
    return make_method(name, classifier, path, 4, projection_dim=8, queue_size=3,
                       generator=torch.Generator().manual_seed(0), **bi_tuning)


def test_every_method_is_one_object_with_the_same_call():
    """`loss, parts, logits = method(views, labels)` for each name, with `num_views` views (the query view first):
    the baselines are cross-entropy on the query view (standard) or on both views in one forward (two_view_ce)."""
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    kinds = {"bi_tuning": (BiTuning, 2), "standard": (CrossEntropy, 1), "two_view_ce": (CrossEntropy, 2)}
    assert set(METHODS) == set(kinds)
    for name in METHODS:
        method = tiny_method(name).eval()  # eval: batch norm on running statistics, so views compare alone
        kind, num_views = kinds[name]
        assert type(method) is kind and method.num_views == num_views
        assert (method.query.projector is not None) == (name == "bi_tuning")
        assert [type(m) for m in method.training_state] == ([TwoHeadClassifier, ClassQueues] if name == "bi_tuning"
                                                            else [])
        assert (method.queues is None) == (name != "bi_tuning")
        loss, parts, logits = method(views[:num_views], labels)
        assert loss.shape == () and logits.shape == (6, 4) and all(v.shape == () for v in parts.values())
        query = method.query(views[0]).logits
        torch.testing.assert_close(logits, query)  # the query view's logits
        if name == "standard":
            assert parts == {} and torch.equal(loss, F.cross_entropy(query, labels))
        elif name == "two_view_ce":
            both = method.query(torch.cat(views)).logits
            assert parts == {} and torch.equal(loss, F.cross_entropy(both, torch.cat([labels, labels])))
        else:
            assert set(parts) == {"loss_ce", "loss_projector", "loss_classifier_contrast"}
    with pytest.raises(ValueError, match="unknown method 'moco'"):
        tiny_method("moco")


def test_bi_tuning_is_its_pieces_and_updates_keys_and_queues_inside_the_call():
    """One call = the momentum update, the key forward, BiTuningLoss with its enqueue, bit for bit; the key encoder
    moves on the first micro-batch of each optimizer step only, towards the query, which it never changes."""
    method = tiny_method("bi_tuning", key_momentum=0.5, temperature=0.1, projector_weight=0.3,
                         classifier_weight=2.0, accumulation_steps=2).train()
    pieces = tiny_method("bi_tuning", key_momentum=0.5, temperature=0.1, projector_weight=0.3,
                         classifier_weight=2.0).train()
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), pieces.state_dict().values()))
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 3, 0, 0])
    with torch.no_grad():  # a query that differs from its key encoder, so that the momentum update shows
        for p in (*method.query.parameters(), *pieces.query.parameters()):
            p.add_(0.01)
    query_before = [p.clone() for p in method.query.parameters()]
    for call in range(3):
        views = [torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)]
        keys_before = [p.clone() for p in method.keys.parameters()]
        ptr_before = method.queues.ptr.clone()
        loss, parts, logits = method(views, labels)
        moved = call % 2 == 0  # accumulation 2: calls 0 and 2 start an optimizer step
        if moved:
            momentum_update(pieces.keys, pieces.query, 0.5)
        query = pieces.query(views[0])
        with torch.no_grad():
            keys = pieces.keys(views[1])
        expected, expected_parts = BiTuningLoss(0.1, 0.3, 2.0)(query, keys, labels, pieces.query.head, pieces.queues)
        assert torch.equal(loss, expected) and torch.equal(logits, query.logits)
        assert all(torch.equal(parts[k], expected_parts[k]) for k in parts)
        assert all(torch.equal(a, b) for a, b in zip(method.queues.state_dict().values(),
                                                     pieces.queues.state_dict().values()))
        assert method.queues.ptr.tolist() == ((ptr_before + torch.tensor([3, 1, 1, 1])) % 3).tolist()
        changed = [not torch.equal(a, b) for a, b in zip(keys_before, method.keys.parameters())]
        assert any(changed) if moved else not any(changed)
        assert all(torch.equal(a, b) for a, b in zip(method.keys.parameters(), pieces.keys.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(query_before, method.query.parameters()))  # only the keys move
    assert all(not p.requires_grad for p in method.keys.parameters())


def test_the_training_loop_never_asks_which_method_it_has():
    """The loop draws `method.num_views` views and calls the method; no branch on --method inside it."""
    source = inspect.getsource(script.main)
    loop = source[source.index("while global_step < length.max_train_steps:"):source.index("progress.close()")]
    assert "args.method" not in loop and "bi_tuning" not in loop and "method.num_views" in loop
    assert "loss, parts, logits = method(views, labels)" in loop


def test_subsets_are_per_class_seeded_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 3, 40])
    a = per_class_subset(labels, 4, seed=0, fraction=0.15)
    assert np.bincount(labels[a], minlength=4).tolist() == [2, 3, 0, 6]  # rounded half up: 1.5 -> 2, 0.45 -> 0
    assert np.array_equal(a, per_class_subset(labels, 4, seed=0, fraction=0.15))
    assert not np.array_equal(a, per_class_subset(labels, 4, seed=1, fraction=0.15))
    b = per_class_subset(labels, 4, seed=0, samples_per_class=5)
    assert np.bincount(labels[b], minlength=4).tolist() == [5, 5, 3, 5]
    kept, held = stratified_split(labels, 4, 0.15, seed=0)
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 3, 1, 6]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))


# ---------------------------------------------------------------------------------------------------------------
# The script.

@pytest.mark.cli
def test_end_to_end_with_accelerate_gives_a_stock_classifier_and_pipeline(classifier_dirs, digits_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--cpu",
         "train_bi_tuning.py", "--pretrained_model_name_or_path", classifier_dirs["resnet"], "--dataset", digits_dir,
         "--output_dir", str(out), *FAST, "--train_fraction", "0.5", "--report_to", "tensorboard"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOAD REPORT" not in proc.stderr  # the head is replaced on purpose: no mismatch report for it
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.num_labels == 10
    assert model.config.id2label[0] == "eight" and model.config.label2id["zero"] == 9  # imagefolder's sorted names
    weights = load_file(str(out / "model.safetensors"))
    assert not any("projector" in k for k in weights) and weights["classifier.1.weight"].shape == (10, 16)
    five = os.path.join(digits_dir, "five")
    digit = Image.open(os.path.join(five, sorted(os.listdir(five))[0]))
    predictions = pipeline("image-classification", model=str(out))(digit, top_k=10)
    assert sorted(p["label"] for p in predictions) == sorted(model.config.id2label.values())
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert card.data.base_model is None and "bi-tuning" in card.data.tags
    assert "held-out accuracy (last step)" in card.text and "queue_size" in card.text
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and results["step"] == 4 and results["method"] == "bi_tuning"
    subset = json.loads((out / "train_subset.json").read_text())
    counts = subset["train_images_per_class"]
    assert results["train_samples"] == sum(counts.values()) == len(subset["train_indices"])
    assert set(subset["validation_indices"]).isdisjoint(subset["train_split_indices"])
    assert (out / "confusion_matrix.png").exists() and list((out / "logs").rglob("events.out.tfevents.*"))
    assert "Traceback" not in proc.stderr


def test_both_contrastive_weights_zero_train_exactly_as_standard(classifier_dirs, digits_dir, tmp_path):
    standard = train(classifier_dirs["resnet"], digits_dir, tmp_path / "standard", "--method", "standard")
    zero = train(classifier_dirs["resnet"], digits_dir, tmp_path / "zero", "--projector_loss_weight", "0",
                 "--classifier_contrast_weight", "0")
    full = train(classifier_dirs["resnet"], digits_dir, tmp_path / "full")
    a, b, c = (r.model.classifier.state_dict() for r in (standard, zero, full))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())  # the losses do act
    assert standard.queues is None and standard.model.projector is None


def test_two_view_control_trains_on_both_views(classifier_dirs, digits_dir, tmp_path, monkeypatch):
    """--method two_view_ce (the benchmark's control): the same query view as standard plus a second one, cross-
    entropy averaged over both, no projector or queues; a stock classifier whose card says so."""
    drawn = []
    real = script.random_resized_views
    monkeypatch.setattr(script, "random_resized_views", lambda *a, **k: drawn.append(real(*a, **k)) or
                        drawn[-1])
    standard = train(classifier_dirs["resnet"], digits_dir, tmp_path / "standard", "--method", "standard")
    first_standard, drawn[:] = drawn[0], []
    control = train(classifier_dirs["resnet"], digits_dir, tmp_path / "control", "--method", "two_view_ce")
    assert torch.equal(drawn[0], first_standard) and not torch.equal(drawn[0], drawn[1])  # query view first
    assert control.queues is None and control.model.projector is None
    a, b = standard.model.classifier.state_dict(), control.model.classifier.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert "averaged over two augmented views" in (tmp_path / "control" / "README.md").read_text()
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "control").config.num_labels == \
        standard.model.classifier.config.num_labels


def test_transformers_example_flags_epochs_and_epoch_checkpoints(classifier_dirs, digits_dir, tmp_path):
    """run_image_classification_no_trainer.py's flags: --num_train_epochs sets the length from the data (drop_last
    batches of the training rows), --checkpointing_steps epoch saves after each pass, --with_tracking is accepted."""
    out = tmp_path / "out"
    run_script(script, ["--model_name_or_path", classifier_dirs["resnet"], "--train_dir", digits_dir, "--output_dir",
                        str(out), "--per_device_train_batch_size", "16", "--num_train_epochs", "2",
                        "--checkpointing_steps", "epoch", "--with_tracking", "--validation_steps", "0",
                        "--queue_size", "4", "--projection_dim", "8", "--per_device_eval_batch_size", "32"])
    rows = json.loads((out / "all_results.json").read_text())["train_samples"]
    per_epoch = rows // 16
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted([f"checkpoint-{per_epoch}",
                                                                      f"checkpoint-{2 * per_epoch}"])
    assert json.loads((out / "all_results.json").read_text())["step"] == 2 * per_epoch
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    with pytest.raises(SystemExit):  # argparse: one of the two lengths
        script.parse_args(["--model_name_or_path", "x", "--dataset", "y", "--max_train_steps", "5",
                           "--num_train_epochs", "1"])
    assert "--with_tracking and --report_to none" in cli_error(script, [
        "--model_name_or_path", "x", "--dataset", "y", "--output_dir", str(tmp_path / "n"), "--with_tracking",
        "--report_to", "none"])


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class TinyConvConfig(PretrainedConfig):
    model_type = "tiny-conv-remote"

    def __init__(self, width=8, num_channels=3, **kwargs):
        self.width, self.num_channels = width, num_channels
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_tiny import TinyConvConfig


class TinyConvClassifier(PreTrainedModel):
    config_class = TinyConvConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(config.num_channels, config.width, 3, padding=1),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, **kwargs):
        return ImageClassifierOutput(logits=self.classifier(self.features(pixel_values)))
'''


def test_a_model_with_its_own_code_needs_trust_remote_code(digits_dir, tmp_path):
    """A repository whose config's auto_map names its own image-classification class: refused in one line without
    --trust_remote_code, trained with it; the output loads with trust_remote_code."""
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    (model_dir / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (model_dir / "modeling_tiny.py").write_text(REMOTE_MODEL)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "tiny-conv-remote", "width": 8, "num_channels": 3, "num_labels": 3,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConvConfig",
                     "AutoModelForImageClassification": "modeling_tiny.TinyConvClassifier"}}))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    remote = AutoModelForImageClassification.from_config(config, trust_remote_code=True)
    remote.save_pretrained(model_dir)  # weights beside the code, as on the Hub
    argv = ["--model_name_or_path", str(model_dir), "--dataset", digits_dir, "--output_dir", str(tmp_path / "out"),
            *FAST[2:]]
    assert "pass --trust_remote_code" in cli_error(script, argv)
    assert not (tmp_path / "out").exists()
    result = run_script(script, [*argv, "--trust_remote_code", "--train_batch_size", "8"])
    assert type(result.model.classifier).__name__ == "TinyConvClassifier" and result.model.head.out_features == 10
    trained = AutoModelForImageClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert not torch.equal(trained.features[0].weight, remote.features[0].weight)


def test_resume_gives_identical_weights_queues_and_pointers(classifier_dirs, digits_dir, tmp_path, monkeypatch):
    """Crash right after the step-3 checkpoint, resume: the same classifier, projector, key encoder and queues as an
    uninterrupted run; with accumulation every micro-batch's keys are enqueued (K = 100 never wraps here)."""
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
              "--queue_size", "100", "--lr_decay_steps", "4"]
    full = train(classifier_dirs["resnet"], digits_dir, tmp_path / "full", *common)
    assert int(full.queues.ptr.sum()) == 6 * 2 * 8

    resumed_dir = str(tmp_path / "resumed")
    killed_at_first_checkpoint(monkeypatch, lambda: train(classifier_dirs["resnet"], digits_dir, resumed_dir, *common))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train(classifier_dirs["resnet"], digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint",
                    "latest")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(full.queues.state_dict().values(),
                                                 resumed.queues.state_dict().values()))
    keys = [torch.load(tmp_path / run / "checkpoint-6" / "custom_checkpoint_0.pkl") for run in ("full", "resumed")]
    assert all(torch.equal(keys[0][k], keys[1][k]) for k in keys[0])
    with pytest.raises(UserError, match="made with --queue_size 100, this run has 50"):
        train(classifier_dirs["resnet"], digits_dir, tmp_path / "resumed", *common[:-4], "--queue_size", "50",
              "--lr_decay_steps", "4", "--resume_from_checkpoint", "latest")


def test_vit_in_bf16_with_gradient_checkpointing_trains_and_loads(classifier_dirs, digits_dir, tmp_path):
    result = train(classifier_dirs["vit"], digits_dir, tmp_path / "out", "--mixed_precision", "bf16",
                   "--gradient_checkpointing", "--samples_per_class", "3")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "ViTForImageClassification" and model.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters()) and result.queues.h.dtype == torch.float32
    subset = json.loads((tmp_path / "out" / "train_subset.json").read_text())
    assert set(subset["train_images_per_class"].values()) == {3} and result.metrics["eval_samples"] > 0
    with pytest.raises(UserError, match="ResNetForImageClassification does not support it"):
        train(classifier_dirs["resnet"], digits_dir, tmp_path / "r", "--gradient_checkpointing")


def test_step_decay_happens_at_the_same_optimizer_step_on_any_process_count():
    """accelerate steps a prepared scheduler once per process per optimizer step: the rules are scaled by it."""
    for processes in (1, 2, 4):
        args = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--max_train_steps",
                                  "10", "--lr_decay_steps", "4", "7"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = script.make_lr_scheduler(optimizer, args, processes, args.max_train_steps)
        lrs = []
        for _ in range(10):
            lrs.append(round(scheduler.get_last_lr()[0], 6))
            for _ in range(processes):
                optimizer.step()
                scheduler.step()
        assert lrs == [1.0] * 4 + [0.1] * 3 + [0.01] * 3
    default = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y"])
    assert script.decay_steps(default, default.max_train_steps) == [6000]  # the reference: x0.1 at 6,000 of 10,000


def test_push_uploads_the_classifier_and_never_the_training_state(classifier_dirs, digits_dir, tmp_path,
                                                                  monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.utils import filter_repo_objects

    from utils.infra import hub

    calls = []
    monkeypatch.setattr(hub, "whoami", lambda token: calls.append(("whoami", token)) or {"name": "me"})
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    out = tmp_path / "out"
    train(classifier_dirs["resnet"], digits_dir, out, "--checkpointing_steps", "2", "--push_to_hub", "--hub_token",
          "hf_secret", "--hub_model_id", "me/digits-bi-tuning")
    assert calls[0] == ("whoami", "hf_secret")  # checked before training
    upload = calls[1][1]
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    uploaded = sorted(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert upload["repo_id"] == "me/digits-bi-tuning" and any(f.startswith("checkpoint-") for f in files)
    assert uploaded == ["README.md", "all_results.json", "config.json", "confusion_matrix.png", "model.safetensors",
                        "preprocessor_config.json", "train_subset.json"]


@pytest.mark.cli
def test_two_processes_hold_identical_queues(classifier_dirs, digits_dir, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train_bi_tuning as s\n"
        "r = s.main(s.parse_args(sys.argv[1:]))\n"
        f"torch.save({{'queues': r.queues.state_dict(), 'model': r.model.state_dict(), 'metrics': r.metrics}}, "
        f"os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(wrapper),
         "--pretrained_model_name_or_path", classifier_dirs["resnet"], "--dataset", digits_dir, "--output_dir",
         str(tmp_path / "out"), *FAST, "--queue_size", "100"],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert int(r0["queues"]["ptr"].sum()) == 4 * 2 * 8  # both processes' keys, every step
    assert all(torch.equal(r0["queues"][k], r1["queues"][k]) for k in r0["queues"])
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert r0["metrics"] == r1["metrics"] and (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, before weights load where possible.

@pytest.mark.parametrize("flags,message", [
    (["--train_fraction", "0"], r"--train_fraction must be in \(0, 1\]"),
    (["--train_fraction", "1.5"], r"--train_fraction must be in \(0, 1\]"),
    (["--queue_size", "0"], "--queue_size must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--key_momentum", "1.1"], r"--key_momentum must be in \[0, 1\]"),
    (["--projector_loss_weight", "-1"], "--projector_loss_weight must be >= 0"),
    (["--classifier_contrast_weight", "-0.5"], "--classifier_contrast_weight must be >= 0"),
    (["--backbone_lr_scale", "-0.1"], "--backbone_lr_scale must be >= 0"),
    (["--projector_lr_scale", "-1"], "--projector_lr_scale must be >= 0"),
    (["--lr_decay_steps", "20000"], "--lr_decay_steps 20000 is beyond the run"),
    (["--samples_per_class", "0"], "--samples_per_class must be >= 1"),
    (["--train_val_split", "1"], r"--train_val_split must be in \(0, 1\)"),
    (["--validation_split", "train"], "--validation_split train is the training split"),
])
def test_impossible_hyperparameters(flags, message):
    with pytest.raises(UserError, match=message):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", *flags])


def test_both_subset_flags_are_refused():
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--train_fraction", "0.5",
                           "--samples_per_class", "3"])


@pytest.fixture(scope="session")
def odd_data(tmp_path_factory):
    """save_to_disk datasets: float labels, one class, and a train/validation dict."""
    root = tmp_path_factory.mktemp("odd")
    images = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": [0.5] * 12}).save_to_disk(root / "float_labels")
    datasets.Dataset.from_dict({"image": images, "label": [0] * 12}).save_to_disk(root / "one_class")
    labels = datasets.ClassLabel(names=["dark", "light"])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(12)]}, features=features),
        "validation": datasets.Dataset.from_dict({"image": images[:5], "label": [0, 1, 0, 1, 1]}, features=features),
    }).save_to_disk(root / "with_validation")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(12)]}),
        "validation": datasets.Dataset.from_dict({"image": images[:3], "label": [0, 1, 7]}),
    }).save_to_disk(root / "bad_validation")
    return root


def test_a_validation_split_is_used_as_it_is(classifier_dirs, odd_data, tmp_path):
    result = run_main(script, classifier_dirs["resnet"], str(odd_data / "with_validation"), tmp_path / "out", *FAST)
    assert result.metrics["eval_samples"] == 5
    subset = json.loads((tmp_path / "out" / "train_subset.json").read_text())
    assert subset["validation"] == "validation" and subset["train_images_per_class"] == {"dark": 6, "light": 6}
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.id2label == {0: "dark", 1: "light"}


def test_a_checkpoint_of_another_class_count_is_refused(classifier_dirs, digits_dir, odd_data, tmp_path):
    train(classifier_dirs["resnet"], digits_dir, tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps",
          "2")
    with pytest.raises(UserError, match="was made with num classes 10, this run has 2"):
        run_main(script, classifier_dirs["resnet"], str(odd_data / "with_validation"), tmp_path / "out", *FAST,
                 "--resume_from_checkpoint", "latest")


def _bad(case, classifier_dirs, digits_dir, odd_data, tmp_path):
    """(model, data, extra flags) of one bad-input case."""
    model, data, extra = classifier_dirs["resnet"], digits_dir, []
    if case == "missing_dataset":
        data = str(tmp_path / "no" / "such" / "folder")
    elif case == "missing_split":
        extra = ["--train_split", "nope"]
    elif case == "missing_column":
        extra = ["--label_column", "nope"]
    elif case == "float_labels":
        data = str(odd_data / "float_labels")
    elif case == "one_class":
        data = str(odd_data / "one_class")
    elif case == "validation_labels":
        data = str(odd_data / "bad_validation")
    elif case == "one_class_folder":
        data = tmp_path / "one_folder"
        (data / "cats").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(data / "cats" / f"{i}.png")
        data = str(data)
    elif case == "empty_class_after_subset":
        extra = ["--train_fraction", "0.02"]
    elif case == "not_a_classifier":
        model = str(tmp_path / "bert")
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                   intermediate_size=8).save_pretrained(model)
    elif case == "timm_without_timm":
        model = str(tmp_path / "timm")
        TimmWrapperConfig(architecture="resnet18").save_pretrained(model)
    elif case == "vit_resolution":
        model, extra = classifier_dirs["vit"], ["--resolution", "24"]
    elif case == "no_processor":
        model = str(tmp_path / "bare")
        ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(
            model)
    return model, data, extra


BAD = [
    ("missing_dataset", "does not exist"),
    ("missing_split", "has no split 'nope'"),
    ("missing_column", "has no label column 'nope'"),
    ("float_labels", "must hold non-negative integers or be a ClassLabel"),
    ("one_class", "has 1 class; a classifier needs at least 2"),
    ("one_class_folder", r"holds one class sub-folder \(cats\); a classifier needs at least 2 classes"),
    ("validation_labels", r"split 'validation' holds labels \[7\] that are not class ids 0..1"),
    ("empty_class_after_subset", r"class\(es\) have no training image .* after --train_fraction"),
    ("not_a_classifier", "is a 'bert' model, which transformers has no image-classification class for"),
    ("timm_without_timm", "is a timm model, which needs the timm package"),
    ("vit_resolution", "the model cannot take the 24x24 images its image processor makes"),
    ("no_processor", "cannot load the image processor of"),
]


@pytest.mark.parametrize("case,message", BAD)
def test_bad_input_is_refused_before_training(case, message, classifier_dirs, digits_dir, odd_data, tmp_path,
                                              monkeypatch):
    if case == "timm_without_timm" and importlib.util.find_spec("timm") is not None:
        monkeypatch.setitem(sys.modules, "timm", None)  # as on our pinned stack: not importable
    model, data, extra = _bad(case, classifier_dirs, digits_dir, odd_data, tmp_path)
    started = []
    monkeypatch.setattr(script, "ResumableLoader", lambda *a, **k: started.append(1))  # training would start here
    with pytest.raises(UserError, match=message):
        run_main(script, model, data, tmp_path / "out", *FAST, *extra)
    assert not started and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.cli
def test_a_bad_input_reads_as_one_line_to_the_user(classifier_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "train_bi_tuning.py", "--pretrained_model_name_or_path",
                           classifier_dirs["resnet"], "--dataset", str(tmp_path / "none" / "x"), "--output_dir",
                           str(tmp_path / "out"), *FAST], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --dataset path ")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (on our pinned stack it "
                    "needs torchvision, which does not import); the refusal is tested above")
def test_a_timm_model_trains_when_timm_imports(digits_dir, tmp_path):  # pragma: no cover - needs timm
    from transformers import TimmWrapperForImageClassification

    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet18", num_labels=3))
    model.save_pretrained(tmp_path / "timm")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "timm")
    result = train(str(tmp_path / "timm"), digits_dir, tmp_path / "out")
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.num_labels == 10
    assert result.metrics["eval_samples"] > 0


def test_help_documents_every_flag_with_its_default():
    help_text = cli_help(script)
    flags = {a.strip("[],") for a in help_text.split() if a.startswith(("--", "[--"))}
    assert {"--method", "--queue_size", "--temperature", "--key_momentum", "--projector_loss_weight",
            "--classifier_contrast_weight", "--train_fraction", "--samples_per_class", "--backbone_lr_scale",
            "--resume_from_checkpoint", "--push_to_hub"} <= flags
    text = " ".join(help_text.split())
    assert "(default: 0.999)" in text and "(default: 40)" in text and "(default: 10000)" in text


@pytest.mark.cli
def test_divergence_stops_every_process_with_one_line(classifier_dirs, digits_dir, tmp_path):
    """A non-finite loss under torchrun: both processes stop at the same step (no hang in a collective), each
    with the one-line error, and nothing is saved."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_bi_tuning.py",
         "--pretrained_model_name_or_path", classifier_dirs["resnet"], "--dataset", digits_dir, "--output_dir",
         str(tmp_path / "out"), *FAST, "--learning_rate", "1e12", "--max_train_steps", "20"],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    # (the two processes' progress bars and messages interleave on one stderr: find the messages, not lines)
    steps = re.findall(r"error: the loss \(\S+ on one process\) is not finite at step (\d+): training diverged",
                       proc.stderr)
    assert len(steps) == 2 and len(set(steps)) == 1, proc.stderr[-3000:]  # both processes, the same step
    assert not (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob("checkpoint-*"))


def test_transformers_example_flags_and_adamw(classifier_dirs, digits_dir, tmp_path):
    """The names of transformers' run_image_classification_no_trainer.py work as aliases, and --optimizer adamw
    trains with torch's AdamW (the card says so)."""
    args = script.parse_args(["--model_name_or_path", classifier_dirs["vit"], "--train_dir", digits_dir,
                              "--per_device_train_batch_size", "6", "--output_dir", str(tmp_path / "x")])
    assert (args.pretrained_model_name_or_path, args.dataset, args.train_batch_size) == (
        classifier_dirs["vit"], digits_dir, 6)
    args = script.parse_args(["--model_name_or_path", "m", "--dataset_name", "someone/data", "--output_dir",
                              str(tmp_path / "y")])
    assert args.dataset == "someone/data" and args.optimizer == "sgd"
    seen = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, *a, **kw):
            seen.append(kw)
            super().__init__(*a, **kw)

    torch.optim.AdamW = Spy
    try:
        train(classifier_dirs["vit"], digits_dir, tmp_path / "out", "--optimizer", "adamw", "--weight_decay", "0.05")
    finally:
        torch.optim.AdamW = real
    assert seen and seen[0]["weight_decay"] == 0.05
    assert "AdamW (weight decay 0.05)" in ModelCard.load(tmp_path / "out" / "README.md").text



def test_validation_dir_and_sample_limits(classifier_dirs, digits_dir, tmp_path):
    """transformers' --validation_dir (a class-folder set held out as it is), --max_train_samples and
    --max_eval_samples (seeded subsets); a validation folder of other classes is refused in one line."""
    import shutil

    held = shutil.copytree(digits_dir, tmp_path / "held")
    result = train(classifier_dirs["resnet"], digits_dir, tmp_path / "out", "--validation_dir", str(held),
                   "--max_train_samples", "40", "--max_eval_samples", "30")
    subset = json.loads((tmp_path / "out" / "train_subset.json").read_text())
    assert subset["validation"] == "validation" and subset["max_train_samples"] == 40
    assert sum(subset["train_images_per_class"].values()) == 40
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_samples"] == 30
    assert result is not None
    shutil.rmtree(held / "nine")
    with pytest.raises(UserError, match="the class folders must be the same"):
        train(classifier_dirs["resnet"], digits_dir, tmp_path / "out2", "--validation_dir", str(held))
