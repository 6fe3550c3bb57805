"""Where a Bi-tuning step's time goes, against a standard fine-tuning step, part by part (issue "Real data and real
runs", item 9: the goal was a step ratio of at most 1.4).

    python -m benchmarks.bi_tuning_speed [--repeats 300] [--threads 1]

A Bi-tuning step does what a standard step does (one augmented view, forward, backward, optimizer step) plus: a
second augmented view, the momentum update of the key encoder, a forward of the key encoder without gradients, the
projector and the two contrastive losses (forward and backward), and the projector's optimizer update. Each part is
timed here on its own with the functions train_bi_tuning.py calls (`random_resized_views`, `TwoHeadClassifier`,
`momentum_update`, `BiTuningLoss`), median of `--repeats` calls after a warm-up, on two backbones built from
configs (random weights: times do not depend on weight values):

- tiny: the benchmark's ResNet (basic blocks, widths 16/32/64, 32 px), batch 16, as in `benchmarks/bi_tuning.py`;
- resnet18: ResNet-18's shape (basic blocks 2/2/2/2, widths 64-512) at 96 px, batch 16.

The floor of the ratio is (standard step + second view + key forward) / standard step: the key forward is the
method's, and on a small network a forward costs about as much as a backward (on large ones about half), so the
floor moves with the network. Then the script's own end-to-end ratio on the resnet18 shape: the median interval
between optimizer steps inside runs of train_bi_tuning.py (`benchmarks.bi_tuning.step_time_ratio`: 40 steps, the
first 10 not counted, `--script_repeats` interleaved pairs); the tiny backbone's is in `benchmarks/bi_tuning.py`.
"""

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

PARTS = ["views", "forward", "momentum update", "key forward", "loss", "backward", "optimizer"]


def backbone(name):
    from transformers import ResNetConfig, ResNetForImageClassification

    if name == "tiny":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
                              downsample_in_first_stage=False, num_labels=5)
        return ResNetForImageClassification(config), 32
    config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                          layer_type="basic", downsample_in_first_stage=False, num_labels=5)
    return ResNetForImageClassification(config), 96


def profile(name, batch, repeats):
    """Median milliseconds of each part of a standard and of a Bi-tuning step."""
    from fixtures.offline_data import sklearn_digits
    from utils.families.image_classifiers import find_head, replace_head
    from utils.infra.augmentation import as_uint8_tensor, normalise, random_resized_views
    from utils.methods.bi_tuning import BiTuningLoss, ClassQueues, TwoHeadClassifier, key_encoder, momentum_update

    torch.manual_seed(0)
    classifier, px = backbone(name)
    head = find_head(classifier, (px, px), 3)
    replace_head(classifier, head, 5)
    images, labels, _ = sklearn_digits()
    from PIL import Image

    pictures = [as_uint8_tensor(Image.fromarray(i).convert("RGB"), 2 * px) for i in images[:batch]]
    labels = torch.as_tensor(labels[:batch] % 5)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    g = torch.Generator().manual_seed(0)

    def view():
        return normalise(random_resized_views(pictures, (px, px), g), 1 / 255, mean, std)

    results = {}
    for method in ("standard", "bi_tuning"):
        bi = method == "bi_tuning"
        model = TwoHeadClassifier(classifier, head, 128 if bi else None).train()
        keys = key_encoder(model) if bi else None
        queues = ClassQueues(5, 40, model.head.in_features, 128) if bi else None
        loss_fn = BiTuningLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4)
        rows = []
        for i in range(repeats + 10):
            t = [time.perf_counter()]
            views = [view() for _ in range(2 if bi else 1)]
            t.append(time.perf_counter())
            query = model(views[0])
            t.append(time.perf_counter())
            if bi:
                momentum_update(keys, model, 0.99)
            t.append(time.perf_counter())
            if bi:
                with torch.no_grad():
                    key = keys(views[1])
            t.append(time.perf_counter())
            if bi:
                loss, _ = loss_fn(query, key, labels, model.head, queues)
            else:
                loss = F.cross_entropy(query.logits.float(), labels)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            if i >= 10:
                rows.append(np.diff(t))
        results[method] = dict(zip(PARTS, 1000 * np.median(np.array(rows), axis=0)))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=300, help="Timed steps per method and backbone.")
    p.add_argument("--script_repeats", type=int, default=3, help="Interleaved pairs of script runs (0: none).")
    p.add_argument("--work_dir", default="benchmarks_out/bi_tuning_speed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on a loaded 2-core machine two were 10x slower than one).")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for name in ("tiny", "resnet18"):
        r = profile(name, 16, a.repeats if name == "tiny" else max(20, a.repeats // 10))
        std, bi = sum(r["standard"].values()), sum(r["bi_tuning"].values())
        floor = std + r["bi_tuning"]["key forward"] + r["standard"]["views"]
        print(f"\n{name}, batch 16, {a.threads} thread(s): median ms per part\n")
        print("| part | standard | Bi-tuning | extra |\n|---|---|---|---|")
        for part in PARTS:
            s, b = r["standard"][part], r["bi_tuning"][part]
            print(f"| {part} | {s:.2f} | {b:.2f} | {b - s:+.2f} |")
        print(f"| **step** | **{std:.2f}** | **{bi:.2f}** | **ratio {bi / std:.2f}** |")
        print(f"\nfloor (standard + second view + key forward) / standard: {floor / std:.2f}; "
              f"forward / backward of the standard step: {r['standard']['forward'] / r['standard']['backward']:.2f}")
    if a.script_repeats:
        print(f"\ntrain_bi_tuning.py, resnet18 shape at 96 px, batch 16: Bi-tuning / standard step "
              f"{script_ratio(a.work_dir, a.script_repeats)}")


def script_ratio(work, repeats):
    import os

    from transformers import ConvNextImageProcessor

    from benchmarks.bi_tuning import save_dataset, step_time_ratio
    from fixtures.offline_data import sklearn_digits

    model_dir = os.path.join(work, "resnet18")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        backbone("resnet18")[0].save_pretrained(model_dir)
        ConvNextImageProcessor(size={"shortest_edge": 96}).save_pretrained(model_dir)
    data = save_dataset(*sklearn_digits(), os.path.join(work, "digits_5_9"), [5, 6, 7, 8, 9])
    ratios = step_time_ratio(work, model_dir, data, repeats=repeats, steps=40, warmup=10)
    return f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, {repeats} pairs)"


if __name__ == "__main__":
    main()
