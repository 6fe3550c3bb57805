"""Bi-tuning (Zhong et al., "Bi-tuning of Pre-trained Representations", arXiv 2011.06182) as one module in the shape
of the reference code's `BiTuning` (thuml/Transfer-Learning-Library, `tllib/regularization/bi_tuning.py`), vectorised,
with its baselines behind the same call.

A script picks the method by name and calls it once per micro-batch; it never asks which method it has:

    method = make_method("bi_tuning", classifier, head_path, num_classes, ...)  # or "standard", "two_view_ce"
    views = [augment(images, generator) for _ in range(method.num_views)]  # the query view first
    loss, parts, logits = method(views, labels)  # logits: the query view's, for the batch accuracy

`method.query` is what trains (the classifier, its head and, for Bi-tuning, the projector): the optimizer's
parameters and what `accelerator.prepare` wraps, after which `method.run_query_through(model)` makes the call go
through the wrapper. `method.training_state` is what a checkpoint must hold besides it (Bi-tuning: the key encoder
and the queues).

`BiTuning` holds the query model, its momentum copy (the key encoder) and per-class queues of K keys. On the
features h that feed the classification layer, two heads: the classifier (cross-entropy plus a contrastive
cross-entropy that uses the labels instance by instance) and a projector z = normalize(Linear(h)) with a
categorical contrastive loss whose positives are keys of the same class. One call:

- the key encoder moves towards the query model, k <- m k + (1 - m) q, on the first micro-batch of each optimizer
  step, before the keys are computed (the reference's order);
- projector logits of sample i of class c, queue read BEFORE the batch is enqueued:
  [z_q.z_k | z_q . queue_z[c] (K) | z_q . keys of every other class ((C-1)K)] / T;
- then the batch's keys are enqueued (each class's ring in batch order);
- classifier-contrast logits, queue read AFTER the enqueue, against w_c = normalize([W_c, b_c]) DETACHED (the
  reference's `.data`: this loss never trains the head): [hn_q.w_c | queue_h[c].w_c | other classes' keys.w_c] / T,
  with hn = normalize([h, 1]) so that hn.w_c is the cosine of the affine logit;
- target 1/(K+1) on the first K+1 columns; loss = CE + a KL_z + b KL_y (KL with batch-mean reduction).

The baselines are `CrossEntropy` objects: `standard` (cross-entropy on one view) and `two_view_ce` (cross-entropy
averaged over two views in one forward: Bi-tuning's two views without its contrastive losses).
"""

import contextlib
import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

METHODS = ("bi_tuning", "standard", "two_view_ce")


class Features(NamedTuple):
    logits: torch.Tensor  # (N, C) the classifier's output
    h: torch.Tensor  # (N, F) the features that feed the head
    z: torch.Tensor | None  # (N, D) normalized projection (None without a projector)
    hn: torch.Tensor  # (N, F + 1) normalize([h, 1])


class TwoHeadClassifier(torch.nn.Module):
    """A transformers image classifier (its final Linear at `head_path` is the classifier head) plus the projector
    (`projection_dim` None: none, as plain fine-tuning). Calling it returns `Features`."""

    def __init__(self, classifier, head_path: str, projection_dim: int | None):
        super().__init__()
        self.classifier, self.head_path = classifier, head_path
        features = self.head.in_features
        self.projector = torch.nn.Linear(features, projection_dim) if projection_dim else None

    @property
    def head(self) -> torch.nn.Linear:
        return self.classifier.get_submodule(self.head_path)

    def forward(self, pixel_values) -> Features:
        captured = []  # the head's input, h; the hook lives for one call only (a deep copy must not share it)

        def keep_input(module, inputs):  # returns None, so the input passes unchanged
            captured.append(inputs[0])

        handle = self.head.register_forward_pre_hook(keep_input)
        try:
            logits = self.classifier(pixel_values=pixel_values).logits
        finally:
            handle.remove()
        h = captured[-1]
        z = F.normalize(self.projector(h), dim=1) if self.projector is not None else None
        hn = F.normalize(torch.cat([h, torch.ones_like(h[:, :1])], dim=1), dim=1)
        return Features(logits, h, z, hn)


def key_encoder(query: TwoHeadClassifier) -> TwoHeadClassifier:
    """The momentum copy: same weights, no gradients, kept in train mode like the reference's."""
    keys = copy.deepcopy(query).requires_grad_(False)
    return keys.train()


@torch.no_grad()
def momentum_update(keys: torch.nn.Module, query: torch.nn.Module, m: float) -> None:
    """k <- m k + (1 - m) q over the parameters (the reference's formula: m = 0 copies q, m = 1 keeps k)."""
    k_params = list(keys.parameters())
    q_params = [p.detach() for p in query.parameters()]
    torch._foreach_mul_(k_params, m)
    torch._foreach_add_(k_params, q_params, alpha=1.0 - m)


class ClassQueues(torch.nn.Module):
    """Per-class rings of K keys: `h` (C, K, F + 1) normalized [h, 1] and `z` (C, K, D), random unit vectors at the
    start, and one pointer per class. Buffers, so they move with `.to()` and are saved with the checkpoint."""

    def __init__(self, num_classes: int, queue_size: int, feature_dim: int, projection_dim: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("h", F.normalize(torch.randn(num_classes, queue_size, feature_dim + 1,
                                                          generator=generator), dim=-1))
        self.register_buffer("z", F.normalize(torch.randn(num_classes, queue_size, projection_dim,
                                                          generator=generator), dim=-1))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, h: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the keys into their classes' rings in batch order, as the reference's per-sample loop does: the
        r-th key of class c in the batch goes to slot (ptr[c] + r) mod K, and when a batch holds more than K keys
        of one class only the last K remain."""
        num_classes, size = self.h.shape[:2]
        onehot = F.one_hot(labels, num_classes)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position among the batch's keys of the same class
        count = onehot.sum(0)
        keep = rank >= count[labels] - size  # earlier keys that a later one overwrites are skipped
        slot = (self.ptr[labels] + rank) % size
        self.h[labels[keep], slot[keep]] = h[keep].to(self.h.dtype)
        self.z[labels[keep], slot[keep]] = z[keep].to(self.z.dtype)
        self.ptr.copy_((self.ptr + count) % size)


def class_order(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C): each sample's own class first, then the other classes ascending (the reference's column order)."""
    classes = torch.arange(num_classes, device=labels.device).expand(len(labels), num_classes)
    return torch.where(classes == labels[:, None], -1, classes).argsort(dim=1)


def _own_class_first(sims: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C, K) similarities to every class's keys -> (N, C * K), own class first."""
    n, c, k = sims.shape
    return sims.gather(1, class_order(labels, c)[:, :, None].expand(n, c, k)).flatten(1)


def projector_logits(z_q, z_k, queue_z, labels, temperature: float) -> torch.Tensor:
    """(N, 1 + C K): [z_q.z_k | own class's queue | other classes' queues] / T."""
    c, k, d = queue_z.shape
    sims = (z_q @ queue_z.reshape(c * k, d).T).view(len(labels), c, k)
    current = (z_q * z_k).sum(1, keepdim=True)
    return torch.cat([current, _own_class_first(sims, labels)], dim=1) / temperature


def classifier_contrast_logits(hn_q, w, queue_h, labels, temperature: float) -> torch.Tensor:
    """(N, 1 + C K): [hn_q.w_c | own class's keys . w_c | other classes' keys . w_c] / T, w = normalized [W, b]
    rows (pass them detached)."""
    c, k, f = queue_h.shape
    current = (hn_q * w[labels]).sum(1, keepdim=True)
    sims = (queue_h.reshape(c * k, f) @ w.T)[:, labels].T.reshape(len(labels), c, k)
    return torch.cat([current, _own_class_first(sims, labels)], dim=1) / temperature


def contrastive_target(batch_size: int, num_classes: int, queue_size: int, device=None) -> torch.Tensor:
    """1/(K+1) on the first K+1 columns (the current key and the own class's queue), 0 elsewhere."""
    target = torch.zeros(batch_size, 1 + num_classes * queue_size, device=device)
    target[:, : queue_size + 1] = 1.0 / (queue_size + 1)
    return target


def contrastive_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), summed over columns and averaged over the batch (KLDivLoss 'batchmean')."""
    return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")


def head_directions(head: torch.nn.Linear) -> torch.Tensor:
    """normalize([W_c, b_c]) per class, detached: the classifier-contrast anchors."""
    return F.normalize(torch.cat([head.weight, head.bias[:, None]], dim=1), dim=1).detach()


class BiTuningLoss:
    """loss = CE(query logits) + projector_weight x KL_z + classifier_weight x KL_y, enqueueing the keys between the
    two reads. `gather(t)` concatenates a tensor over processes (identity on one): every process enqueues the whole
    global batch, so all hold the same queues. Returns (loss, {loss_ce, loss_projector, loss_classifier_contrast})."""

    def __init__(self, temperature: float = 0.07, projector_weight: float = 1.0, classifier_weight: float = 1.0):
        self.temperature = temperature
        self.projector_weight, self.classifier_weight = projector_weight, classifier_weight

    def __call__(self, query: Features, keys: Features, labels: torch.Tensor, head: torch.nn.Linear,
                 queues: ClassQueues, gather=lambda t: t):
        num_classes, queue_size = queues.h.shape[:2]
        ce = F.cross_entropy(query.logits.float(), labels)
        # a snapshot: backward needs the queue as it was read, and the enqueue below writes into it
        logits_z = projector_logits(query.z.float(), keys.z.float(), queues.z.clone(), labels, self.temperature)
        queues.enqueue(gather(keys.hn.float().contiguous()), gather(keys.z.float().contiguous()), gather(labels))
        logits_y = classifier_contrast_logits(query.hn.float(), head_directions(head).float(), queues.h, labels,
                                              self.temperature)
        target = contrastive_target(len(labels), num_classes, queue_size, labels.device)
        kl_z, kl_y = contrastive_kl(logits_z, target), contrastive_kl(logits_y, target)
        loss = ce + self.projector_weight * kl_z + self.classifier_weight * kl_y
        return loss, {"loss_ce": ce, "loss_projector": kl_z, "loss_classifier_contrast": kl_y}


class QueryMethod(torch.nn.Module):
    """What the methods share: `query`, the model that trains, and the call `method(views, labels)` ->
    (loss, parts to log, the query view's logits). `num_views`: the augmented views of each image a call takes."""

    num_views: int

    def __init__(self, query: TwoHeadClassifier):
        super().__init__()
        self.query = query
        self.run_query_through(query)

    def run_query_through(self, model: torch.nn.Module) -> None:
        """Call `model` for the query features: the query as `accelerator.prepare` returned it, since a DDP wrapper
        synchronises the gradients only when it is itself called (and `query` again before the process group ends).
        Kept off the submodules: it holds the same weights as `query`."""
        object.__setattr__(self, "run_query", model)

    @property
    def training_state(self) -> tuple[torch.nn.Module, ...]:
        """What a checkpoint holds besides the query model and the optimizer (accelerate's
        `register_for_checkpointing`, in this order)."""
        return ()


class CrossEntropy(QueryMethod):
    """Plain fine-tuning: the cross-entropy of the classifier averaged over `num_views` augmented views of each image,
    all in one forward (1: `standard`; 2: `two_view_ce`, the control that sees Bi-tuning's two views without its
    contrastive losses). No projector, key encoder or queues."""

    queues = None

    def __init__(self, query: TwoHeadClassifier, num_views: int = 1):
        super().__init__(query)
        self.num_views = num_views

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor):
        logits = self.run_query(views[0] if len(views) == 1 else torch.cat(views)).logits
        loss = F.cross_entropy(logits.float(), labels.repeat(len(views)))
        return loss, {}, logits[: len(labels)]


class BiTuning(QueryMethod):
    """The query model (a `TwoHeadClassifier` with a projector), its key encoder and the class queues (the queues
    start as random unit vectors from `generator`). `gather(t)` concatenates a tensor over processes (identity on
    one): every process enqueues the whole global batch, so all hold the same queues. `autocast()`: the mixed
    precision the key encoder runs under (the prepared query model has its own)."""

    num_views = 2  # the query view, then the key view

    def __init__(self, query: TwoHeadClassifier, num_classes: int, *, queue_size: int = 40,
                 key_momentum: float = 0.999, temperature: float = 0.07, projector_weight: float = 1.0,
                 classifier_weight: float = 1.0, accumulation_steps: int = 1, generator: torch.Generator | None = None,
                 gather=None, autocast=None):
        super().__init__(query)
        self.keys = key_encoder(query)
        self.queues = ClassQueues(num_classes, queue_size, query.head.in_features, query.projector.out_features,
                                  generator)
        self.loss = BiTuningLoss(temperature, projector_weight, classifier_weight)
        self.key_momentum, self.accumulation_steps = key_momentum, accumulation_steps
        self.gather = gather or (lambda t: t)
        self.autocast = autocast or contextlib.nullcontext
        # micro-batches seen: a run resumes at an optimizer step's boundary, so the count needs no checkpoint
        self.micro_batches = 0

    @property
    def training_state(self) -> tuple[torch.nn.Module, ...]:
        return self.keys, self.queues

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor):
        query = self.run_query(views[0])
        if self.micro_batches % self.accumulation_steps == 0:  # once per optimizer step, before the keys
            momentum_update(self.keys, self.query, self.key_momentum)
        self.micro_batches += 1
        with torch.no_grad(), self.autocast():
            keys = self.keys(views[1])
        loss, parts = self.loss(query, keys, labels, self.query.head, self.queues, self.gather)
        return loss, parts, query.logits


def make_method(name: str, classifier, head_path: str, num_classes: int, *, projection_dim: int = 128,
                **bi_tuning) -> QueryMethod:
    """The method `name` (one of METHODS) around `classifier`, whose final Linear at `head_path` is the head.
    `bi_tuning`: BiTuning's keyword arguments (ignored by the baselines)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    if name == "bi_tuning":
        return BiTuning(TwoHeadClassifier(classifier, head_path, projection_dim), num_classes, **bi_tuning)
    return CrossEntropy(TwoHeadClassifier(classifier, head_path, None), num_views=2 if name == "two_view_ce" else 1)
