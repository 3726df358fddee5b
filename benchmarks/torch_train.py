"""ResNet-18 trained on a folder of dog photos with plain PyTorch: the reference for timing whole commands.

The counterpart of `python -m tfdogs.train` in `tfdogs.bench_end_to_end`: the
same photos, split, network, optimizer and number of epochs, written the way
an expert PyTorch user would on a CPU (channels-last, bfloat16 autocast, a
`DataLoader` with persistent worker processes). It stands alone: torch,
torchvision and Pillow only, no tfdogs import, so it runs in an environment
of its own (torchvision cannot be imported beside the project's torch).

    python benchmarks/torch_train.py --data-dir shared/data/dogs10 --strategy scratch \\
        --epochs 6 --batch-size 32 --image-size 224 --output runs/torch-scratch
    python benchmarks/torch_train.py --data-dir shared/data/dogs10 --strategy feature-extract \\
        --weights resnet18-random.pth --epochs 10 --output runs/torch-feature-extract

Photos: one folder per breed (`DIR/<breed>/**/*.jpg`) or the Kaggle layout
(`DIR/labels.csv` with `id,breed` beside `DIR/train/<id>.jpg`). Each breed
keeps round(n x `--val-fraction`) photos (at least 1, at most n - 1) for
validation, drawn with `--seed`, as tfdogs' split does.

Strategies: `scratch` trains every parameter; `feature-extract` freezes the
backbone (no gradients, BatchNorm in eval mode so its statistics stay) and
trains the new classifier only. `--weights` loads a torchvision ResNet-18
state dict (1000 classes) before the classifier is replaced.

Every epoch prints the training loss and the validation accuracy and log loss;
the end writes `OUTPUT/model.pt` (state dict; the classifier is `fc.1`, behind
the dropout `fc.0`) and `OUTPUT/classes.json`, and
prints one JSON line of timings: `startup_seconds` (imports, data listing,
model, first worker start-up excluded), `epoch_seconds` (training and
validation of each epoch), `save_seconds` and `total_seconds` (from the first
line of this script).
"""

import time

STARTED = time.perf_counter()  # before the imports: they are part of what a user waits for

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


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
    """Training (random-resized crop, flip) and validation (resize, centre crop) loaders."""
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(args.crop_scale_min, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise])
    val_transform = transforms.Compose([
        transforms.Resize(round(args.image_size / 0.875)), transforms.CenterCrop(args.image_size),
        transforms.ToTensor(), normalise])

    def subset(indices, transform):
        return Photos([paths[i] for i in indices], [labels[i] for i in indices], transform)

    common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(
        subset(train_indices, train_transform), shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = torch.utils.data.DataLoader(subset(val_indices, val_transform), shuffle=False, **common)
    return train_loader, val_loader


# ----------------------------------------------------------------------------- model


def build_model(num_classes, weights, dropout):
    """torchvision's ResNet-18, optionally from a state dict, with a new classifier for `num_classes`."""
    model = torchvision.models.resnet18(weights=None)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    return model.to(memory_format=torch.channels_last)


def trainable_parameters(model, strategy):
    """Freezes the backbone for feature extraction; returns AdamW groups (no decay on biases or BatchNorm)."""
    if strategy == "feature-extract":
        for parameter in model.parameters():
            parameter.requires_grad = False
        for parameter in model.fc.parameters():
            parameter.requires_grad = True
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return [{"params": [p for p in trainable if p.ndim > 1]},
            {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]


def set_training_mode(model, strategy):
    """Training mode, except a frozen backbone: its BatchNorm keeps normalising with its own statistics."""
    if strategy == "feature-extract":
        model.eval()
        model.fc.train()
    else:
        model.train()


# ----------------------------------------------------------------------------- training


def train_one_epoch(model, loader, optimizer, scheduler, strategy):
    """One pass over the training loader; returns the mean training loss."""
    set_training_mode(model, strategy)
    total, count = 0.0, 0
    for images, labels in loader:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


def validate(model, loader):
    """Accuracy and log loss (the Kaggle score: mean negative log probability of the true breed)."""
    model.eval()
    correct, log_loss, count = 0, 0.0, 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for images, labels in loader:
            logits = model(images.contiguous(memory_format=torch.channels_last)).float()
            log_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    return correct / count, log_loss / count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="class folders, or labels.csv + train/")
    parser.add_argument("--output", required=True, help="folder for model.pt and classes.json")
    parser.add_argument("--strategy", choices=("scratch", "feature-extract"), default="scratch")
    parser.add_argument("--weights", help="torchvision ResNet-18 state dict (.pth) to start from")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW peak rate, cosine decay per step")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW, not on biases or BatchNorm")
    parser.add_argument("--dropout", type=float, default=0.2, help="before the classifier, as tfdogs' head")
    parser.add_argument("--crop-scale-min", type=float, default=0.08, help="smallest RandomResizedCrop area")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    paths, breeds = find_photos(args.data_dir)
    class_names = sorted(set(breeds))
    labels = [class_names.index(breed) for breed in breeds]
    train_indices, val_indices = stratified_split(labels, args.val_fraction, args.seed)
    if len(train_indices) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train_indices)} training photos.")
    train_loader, val_loader = make_loaders(args, paths, labels, train_indices, val_indices)
    model = build_model(len(class_names), args.weights, args.dropout)
    optimizer = torch.optim.AdamW(trainable_parameters(model, args.strategy), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    print(f"{len(class_names)} breeds, {len(train_indices)} training and {len(val_indices)} validation photos; "
          f"{args.strategy}, {len(train_loader)} steps per epoch, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)

    startup_seconds = time.perf_counter() - STARTED
    epoch_seconds = []
    for epoch in range(args.epochs):
        epoch_started = time.perf_counter()
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, args.strategy)
        accuracy, log_loss = validate(model, val_loader)
        epoch_seconds.append(time.perf_counter() - epoch_started)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {train_loss:.4f}, val accuracy {accuracy:.4f}, "
              f"val log loss {log_loss:.4f} ({epoch_seconds[-1]:.1f} s)", flush=True)

    save_started = time.perf_counter()
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output / "model.pt")
    (output / "classes.json").write_text(json.dumps(class_names))
    save_seconds = time.perf_counter() - save_started
    print(json.dumps({
        "strategy": args.strategy, "epochs": args.epochs, "val_accuracy": accuracy, "val_log_loss": log_loss,
        "startup_seconds": round(startup_seconds, 3), "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "save_seconds": round(save_seconds, 3), "total_seconds": round(time.perf_counter() - STARTED, 3)}))


if __name__ == "__main__":
    main()
