"""The PyTorch side of `python -m tfdogs.bench`: one measurement per process.

`tfdogs.bench` runs this script with the Python of an environment that has
torch and torchvision (they need not share one with TensorFlow) and reads the
JSON line it prints last. It can be run by hand too:

    python benchmarks/torch_bench.py --part train --model resnet18 --setting tuned
    python benchmarks/torch_bench.py --part pipeline --files files.txt --workers 2

Parts and settings:
    pipeline  torchvision `DataLoader` over JPEG files: PIL decode,
              RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize,
              `--workers` worker processes (the study notebook's recipe).
    train     Adam training steps on a fixed random batch (no input cost).
    inference forward passes in `torch.inference_mode` on a fixed batch.
    fp32      plain float32, contiguous (NCHW) tensors.
    tuned     what an expert does: channels-last memory format, and bfloat16
              autocast on CPU or float16 autocast (with a gradient scaler) on GPU.

Only this folder imports torch and torchvision; the LeNet-5 here mirrors
`tfdogs.models.lenet` (torchvision has none).
"""

import argparse
import json
import pathlib

import torch
import torchvision
from torch import nn

from tfdogs_measure import load_measure  # this folder's helper: tfdogs' measure.py without TensorFlow

measure = load_measure()

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LeNet5(nn.Module):
    """tfdogs' LeNet-5 (tanh, average pooling, full C3) for RGB input of `image_size`."""

    def __init__(self, num_classes, image_size):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, num_classes))

    def forward(self, images):
        return self.classifier(self.features(images))


def build_model(name, num_classes, image_size):
    if name == "lenet5":
        return LeNet5(num_classes, image_size)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def autocast(device, tuned):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    return torch.autocast(device, dtype=dtype, enabled=tuned)


def model_runner(args, training):
    """`run_steps(n)` for training or inference steps, and the device's synchronize."""
    device, tuned = args.device, args.setting == "tuned"
    model = build_model(args.model, args.num_classes, args.image_size).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if training:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        # float16 needs loss scaling; bfloat16 has float32's range and does not.
        scaler = torch.amp.GradScaler(device, enabled=tuned and device == "cuda")

        def run_steps(steps):
            for _ in range(steps):
                with autocast(device, tuned):
                    loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    else:
        model.eval()

        def run_steps(steps):
            with torch.inference_mode(), autocast(device, tuned):
                for _ in range(steps):
                    model(images)
    synchronize = torch.cuda.synchronize if device == "cuda" else None
    return run_steps, synchronize


class ImageFiles(torch.utils.data.Dataset):
    """JPEG files with dummy labels, loaded the torchvision ImageFolder way (PIL, RGB)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with open(self.paths[index], "rb") as file:
            image = Image.open(file).convert("RGB")
        return self.transform(image), 0


def pipeline_runner(args):
    from torchvision import transforms

    paths = pathlib.Path(args.files).read_text().split("\n")
    paths = [path for path in paths if path]
    needed = (args.warmup_steps + args.window_steps * args.windows + 2 * args.workers + 2) * args.batch_size
    paths = (paths * (needed // len(paths) + 1))[:needed]  # one long epoch: no worker restarts to time
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.image_size, scale=(args.crop_scale_min, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers)
    batches = iter(loader)

    def run_steps(steps):
        for _ in range(steps):
            next(batches)
    return run_steps, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("pipeline", "train", "inference"), required=True)
    parser.add_argument("--model", default="resnet18", choices=("lenet5", "resnet18", "resnet34"))
    parser.add_argument("--setting", default="fp32", choices=("fp32", "tuned", "dataloader"),
                        help="fp32 or tuned for train/inference; the pipeline has one setting, dataloader")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=120)
    parser.add_argument("--files", help="pipeline: text file listing JPEG paths, one a line")
    parser.add_argument("--workers", type=int, default=2, help="pipeline: DataLoader worker processes")
    parser.add_argument("--crop-scale-min", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--window-steps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timing = measure.Timing(args.warmup_steps, args.window_steps, args.windows)
    with measure.PeakMemory() as memory:
        if args.part == "pipeline":
            run_steps, synchronize = pipeline_runner(args)
        else:
            run_steps, synchronize = model_runner(args, training=args.part == "train")
        result = measure.throughput(run_steps, args.batch_size, timing, synchronize)
    result.update(peak_rss_mb=memory.peak_mb, device=args.device, threads=torch.get_num_threads(),
                  versions=f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
