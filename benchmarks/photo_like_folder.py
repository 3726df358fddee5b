"""A class-folder tree of generated photo-like JPEGs, to time whole commands on more photos than dogs10 has.

    python benchmarks/photo_like_folder.py /tmp/photos300 --photos 300 --breeds 110
    python -m tfdogs.bench --end-to-end --data-dir /tmp/photos300 --torch-python venv-bench/bin/python --repeats 2

The photos are `tfdogs.bench.steps.make_photo_like_jpegs` (shapes on a noisy
background, 500x375, about 40 kB each at JPEG quality 85, near the Kaggle
photos' 34 kB), dealt in turn into `breed-000/`, `breed-001/`, ... What they
cost to read, decode, check and push through a network is what real photos
cost; what a network learns from them is not, so they time commands and
score nothing. Every file differs (no two share bytes), so the data check
groups none as duplicates.
"""

import argparse
import pathlib
import sys

from tfdogs.bench.steps import make_photo_like_jpegs


def write_folder(folder, photos, breeds, seed=0):
    """Writes `photos` JPEGs into `breeds` class folders under `folder` (photo i into breed i mod breeds).

    Returns:
        The paths written, in order.
    """
    if photos < 2 * breeds:
        raise ValueError(f"{photos} photos for {breeds} breeds: each breed needs 2 (one for validation).")
    folder = pathlib.Path(folder)
    generated = make_photo_like_jpegs(folder / ".generated", count=photos, seed=seed)
    paths = []
    for index, path in enumerate(map(pathlib.Path, generated)):
        target = folder / f"breed-{index % breeds:03d}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        paths.append(target)
    (folder / ".generated").rmdir()
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where the class folders go (created)")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--breeds", type=int, default=110)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_folder(args.folder, args.photos, args.breeds, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(paths)} photo-like JPEGs in {args.breeds} class folders under {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
