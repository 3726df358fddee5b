"""Tests for tfdogs.check: every bad case of issue 6 is listed, odd formats decode right, training goes on."""

import json
import os
import pathlib
import shutil
import sys

import bad_corpus
import numpy as np
import pandas as pd
import pytest
from conftest import small_config
from PIL import Image

from tfdogs import check, config as config_lib, data
from tfdogs.data import validation
from tfdogs.serving import saved_model
from tfdogs.training import loop as training_loop, prepare

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class OpenedFiles:
    """Records every file Python opens for reading (Pillow, csv, ...) while recording is on.

    A process-wide audit hook; TensorFlow's own reads happen in C++ and are checked by their paths instead.
    """

    paths, recording = [], False

    @classmethod
    def hook(cls, event, args):
        if cls.recording and event == "open" and isinstance(args[0], (str, pathlib.Path)):
            flags = args[2] if isinstance(args[2], int) else os.O_RDONLY
            if flags & os.O_ACCMODE != os.O_WRONLY:  # writes (autograph's temporary files) read nothing
                cls.paths.append(pathlib.Path(args[0]).resolve())


sys.addaudithook(OpenedFiles.hook)


def as_set(problems):
    return {(p.file, p.line, p.kind, p.action) for p in problems}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    expected, odd, outside = bad_corpus.write_kaggle_corpus(base / "data")
    return base / "data", expected, odd, outside


@pytest.fixture(scope="module")
def checked(corpus, tmp_path_factory):
    """The corpus' report (copies in a converted folder), and every file Python opened to make it."""
    root = corpus[0]
    converted = tmp_path_factory.mktemp("converted")
    OpenedFiles.paths, OpenedFiles.recording = [], True
    try:
        report = validation.check_data(root, converted_dir=converted)
    finally:
        OpenedFiles.recording = False
    return report, converted, list(OpenedFiles.paths)


def test_every_bad_case_is_listed_and_nothing_else(corpus, checked):
    _, expected, _, _ = corpus
    report, _, _ = checked
    assert as_set(report.problems) == as_set(expected)
    assert all(problem.reason for problem in report.problems)
    # good images, the decodable odd files and the single "solo" image remain; "ghost" lost its only image
    assert len(report.records.paths) == 4 * 8 + 1 + len(DECODED_CASES)
    assert report.records.class_names == sorted(bad_corpus.GOOD_BREEDS + (bad_corpus.SOLO_BREED,))


def test_breed_names_with_spaces_capitals_and_unicode_are_kept_verbatim(checked):
    report, _, _ = checked
    for name in ("Great Dane", "épagneul breton", "柴犬"):
        assert name in report.records.class_names


DECODED_CASES = {  # case: (expected colour, tolerance)
    "png_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "gif_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "bmp_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "palette_bmp_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "webp_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "tiff_named_jpg": (bad_corpus.CASE_COLOUR, 1),
    "cmyk_jpeg": (bad_corpus.CASE_COLOUR, 6),
    "grayscale_jpeg": ((Image.new("RGB", (1, 1), bad_corpus.CASE_COLOUR).convert("L").getpixel((0, 0)),) * 3, 3),
    "rgba_png": (bad_corpus.CASE_COLOUR, 1),
    "one_pixel": (bad_corpus.CASE_COLOUR, 6),
    "huge_jpeg": (bad_corpus.CASE_COLOUR, 6),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_odd_formats_decode_to_the_right_colours_in_both_pipelines(corpus, checked, training):
    """PNG/GIF/BMP/WebP/TIFF named .jpg, CMYK, grayscale, RGBA, 1x1 and huge: the pipeline sees the real colour."""
    root, _, odd, _ = corpus
    report, _, _ = checked
    source_of = dict(zip(report.records.paths, report.sources))
    sources = [source_of[str(root / odd[case])] for case in DECODED_CASES]
    dataset = data.make_dataset(sources, np.arange(len(sources)), image_size=32, batch_size=len(sources),
                                training=training, scale=(0.08, 1.0), **UNIT)
    images, labels = next(iter(dataset))
    for image, label in zip(images.numpy(), labels.numpy()):
        case = list(DECODED_CASES)[label]
        colour, tolerance = DECODED_CASES[case]
        centre = image[16, 16] * 255
        assert np.abs(centre - colour).max() <= tolerance, f"{case}: decoded {centre.round()}, expected {colour}"


def test_files_tensorflow_cannot_decode_correctly_get_an_rgb_copy(corpus, checked):
    root, _, odd, _ = corpus
    report, converted, _ = checked
    source_of = dict(zip(report.records.paths, report.sources))
    copies = {case: pathlib.Path(source_of[str(root / odd[case])])
              for case in ("cmyk_jpeg", "palette_bmp_named_jpg", "tiff_named_jpg", "huge_jpeg")}
    for case, copy in copies.items():
        assert copy.parent == converted, case
        assert Image.open(copy).mode == "RGB", case
    assert copies["cmyk_jpeg"].suffix == ".png"
    # the 10,000 x 8,000 photo is shrunk once, to 4096 px on its longer side
    assert Image.open(copies["huge_jpeg"]).size == (4096, 3277)
    # files TensorFlow decodes as they are are read in place
    assert source_of[str(root / odd["png_named_jpg"])] == str(root / odd["png_named_jpg"])


def test_copies_are_reused_by_a_second_check(corpus, checked):
    report, converted, _ = checked
    before = {path.name: path.stat().st_mtime_ns for path in converted.iterdir()}
    again = validation.check_data(corpus[0], converted_dir=converted)
    assert again.sources == report.sources
    assert {path.name: path.stat().st_mtime_ns for path in converted.iterdir()} == before


def test_no_file_outside_the_data_directory_is_opened(corpus, checked):
    root, _, _, outside = corpus
    report, converted, opened = checked
    assert opened, "the audit hook saw no file opened"
    allowed = (root.resolve(), converted.resolve())
    imports = [pathlib.Path(sys.prefix).resolve(), pathlib.Path(sys.base_prefix).resolve()]
    strays = [path for path in opened if not any(folder in path.parents for folder in allowed)
              and not (path.suffix in (".py", ".pyc", ".so") or any(lib in path.parents for lib in imports))]
    assert strays == []
    for path in outside:
        assert path.resolve() not in opened
    # TensorFlow (whose reads the hook cannot see) only gets the usable files
    assert all(any(folder in pathlib.Path(p).resolve().parents for folder in allowed) for p in report.sources)


def test_class_folders_list_broken_files_and_links_out(tmp_path):
    expected, outside = bad_corpus.write_folder_corpus(tmp_path / "data")
    report = validation.check_data(tmp_path / "data")
    assert as_set(report.problems) == as_set(expected)
    assert report.records.class_names == sorted(bad_corpus.GOOD_BREEDS)
    assert str(outside) not in report.sources and len(report.sources) == 4 * 3 + 1


@pytest.mark.parametrize("header", ["id,breed", "\ufeffID, Breed ", "breed,id"])
def test_labels_csv_header_variants_that_name_both_columns_are_read(tmp_path, header):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "train" / "abc.jpg")
    row = "abc,pug" if header.strip("\ufeff ").lower().startswith("id") else "pug,abc"
    (tmp_path / "labels.csv").write_text(f"{header}\n{row}\n", encoding="utf-8")
    report = validation.check_data(tmp_path)
    assert report.records.class_names == ["pug"] and report.problems == []


@pytest.mark.parametrize("content, message", [
    ("image,label\nabc,pug\n", r"header is 'image,label'; expected 'id,breed'"),
    ("abc,pug\n", r"header is 'abc,pug'; expected 'id,breed'"),
    ("id,breed\n", "has a header but no images"),
    ("", "is empty; expected a header 'id,breed'"),
    (b"id,breed\nabc,\xff\xfe\n", "is not UTF-8 text"),
])
def test_unreadable_labels_csv_fails_with_a_clear_message(tmp_path, content, message):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "abc.jpg")
    path = tmp_path / "labels.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(data.DataError, match=message) as error:
        validation.check_data(tmp_path)
    assert str(path) in str(error.value)


def test_empty_directory_fails_with_a_clear_message(tmp_path, capsys):
    assert check.main(["--data-dir", str(tmp_path)]) == 2
    assert "nothing (empty directory)" in capsys.readouterr().err


def test_nothing_usable_fails_and_lists_why(tmp_path):
    (tmp_path / "pug").mkdir()
    (tmp_path / "pug" / "a.jpg").write_bytes(b"")
    (tmp_path / "pug" / "b.jpg").write_text("not a photo")
    with pytest.raises(data.DataError, match="no usable image") as error:
        validation.check_data(tmp_path)
    assert "pug/a.jpg: skipped, empty file" in str(error.value)
    assert "pug/b.jpg: skipped, not an image" in str(error.value)


def test_command_line_lists_every_problem_and_strict_fails(tmp_path, capsys):
    expected, _ = bad_corpus.write_folder_corpus(tmp_path / "data")
    report_path = tmp_path / "problems.csv"
    assert check.main(["--data-dir", str(tmp_path / "data"), "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    for problem in expected:
        assert problem.file in out
    assert "13 usable images in 4 breeds" in out
    listed = pd.read_csv(report_path, keep_default_na=False)
    assert set(zip(listed["file"], listed["kind"], listed["action"])) == {
        (e.file, e.kind, e.action) for e in expected}

    assert check.main(["--data-dir", str(tmp_path / "data"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "strict: 2 problems would skip data" in err and "Great Dane/broken.jpeg" in err


def write_copies_corpus(root):
    """Class folders of distinct photos, one photo copied under another name, and one copied into another breed.

    Returns:
        (the same-breed pair, the conflicting pair), as files relative to root.
    """
    rng = np.random.default_rng(3)
    for breed, colour in zip(("beagle", "pug"), bad_corpus.GOOD_COLOURS):
        (root / breed).mkdir(parents=True)
        for i in range(6):
            bad_corpus.noisy(colour, rng).save(root / breed / f"{i}.jpg", format="JPEG")
    (root / "beagle" / "copy-of-0.jpg").write_bytes((root / "beagle" / "0.jpg").read_bytes())
    (root / "pug" / "beagle-1.jpg").write_bytes((root / "beagle" / "1.jpg").read_bytes())
    return ("beagle/0.jpg", "beagle/copy-of-0.jpg"), ("beagle/1.jpg", "pug/beagle-1.jpg")


def test_byte_identical_photos_form_one_group_listed_with_each_other(tmp_path, capsys):
    pair, conflict = write_copies_corpus(tmp_path / "data")
    report = validation.check_data(tmp_path / "data")
    files = [pathlib.Path(path).relative_to(tmp_path / "data").as_posix() for path in report.records.paths]
    assert len(files) == 14  # copies are kept
    groups = {file: group for file, group in zip(files, report.groups.tolist())}
    assert groups[pair[0]] == groups[pair[1]] and groups[conflict[0]] == groups[conflict[1]]
    assert len(set(groups.values())) == 12  # every other photo is alone in its group
    assert sorted(sorted(files[i] for i in group) for group in report.duplicate_groups) == sorted(
        sorted(group) for group in (pair, conflict))

    listed = {(p.file, p.kind, p.action): p.reason for p in report.problems}
    assert listed.keys() == {(pair[0], "duplicate-photo", "kept"), (pair[1], "duplicate-photo", "kept"),
                             (conflict[0], "duplicate-photo-conflict", "kept"),
                             (conflict[1], "duplicate-photo-conflict", "kept")}
    # each names the other copy; the conflict names both breeds
    assert pair[1] in listed[(pair[0], "duplicate-photo", "kept")]
    assert pair[0] in listed[(pair[1], "duplicate-photo", "kept")]
    conflict_reason = listed[(conflict[1], "duplicate-photo-conflict", "kept")]
    assert conflict[0] in conflict_reason and "'beagle'" in conflict_reason and "'pug'" in conflict_reason

    report_path = tmp_path / "problems.csv"
    assert check.main(["--data-dir", str(tmp_path / "data"), "--report", str(report_path)]) == 0
    assert "2 groups of byte-identical photos (4 files" in capsys.readouterr().out
    written = pd.read_csv(report_path, keep_default_na=False)
    assert set(zip(written["file"], written["kind"], written["action"])) == set(listed)


def test_the_split_of_a_run_keeps_byte_identical_photos_on_one_side_for_every_seed(tmp_path):
    pair, conflict = write_copies_corpus(tmp_path / "data")
    sides = []
    for seed in range(10):
        run_dir = tmp_path / f"run-{seed}"
        run_dir.mkdir()
        config = small_config(data=None, data_dir=str(tmp_path / "data"), val_fraction=0.5, seed=seed,
                              output=str(run_dir))
        prepare.load_data(config, run_dir)
        split = pd.read_csv(run_dir / "split.csv").set_index("path")["subset"]
        assert len(split) == 14
        for group in (pair, conflict):
            assert split[group[0]] == split[group[1]], f"seed {seed}: {group} split across {list(split[list(group)])}"
        # still stratified: half of each breed's 7 photos, give or take the copies moving together
        assert all(2 <= count <= 5 for count in split[split == "val"].index.str.split("/").str[0].value_counts())
        listed = pd.read_csv(run_dir / "problems.csv", keep_default_na=False)
        assert set(listed["file"]) == set(pair + conflict)
        sides.append(split[pair[0]])
    assert set(sides) == {"train", "val"}  # the seeds do move the pair


def test_a_breed_with_one_photo_is_refused_before_any_work_naming_it(corpus, tmp_path):
    config = small_config(data=None, data_dir=str(corpus[0]), batch_size=8, epochs=2,
                          output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    with pytest.raises(data.DataError, match=f"breed '{bad_corpus.SOLO_BREED}' .* single usable photo.*val_fraction"):
        training_loop.train(config)
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()


def test_training_over_the_mixed_corpus_uses_the_good_files_and_lists_every_bad_one(corpus, tmp_path):
    _, expected, odd, _ = corpus
    # The corpus with a second photo of its one-photo breed (which alone is refused, see above).
    root = tmp_path / "data"
    shutil.copytree(corpus[0], root, symlinks=True)
    Image.open(root / "train" / "solo-0.jpg").save(root / "train" / "solo-1.jpg", quality=50)
    with open(root / "labels.csv", "a") as labels:
        labels.write(f"solo-1,{bad_corpus.SOLO_BREED}\n")
    config = small_config(data=None, data_dir=str(root), batch_size=8, epochs=2,
                          output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    run_dir = training_loop.train(config)

    listed = pd.read_csv(run_dir / "problems.csv", keep_default_na=False)
    lines = [None if line == "" else int(line) for line in listed["line"]]
    assert set(zip(listed["file"], lines, listed["kind"], listed["action"])) == as_set(expected)

    split = pd.read_csv(run_dir / "split.csv", keep_default_na=False)
    assert len(split) == 4 * 8 + 2 + len(DECODED_CASES)
    assert not split["path"].str.contains("converted").any()  # the split names the original files
    solo = split[split["breed"] == bad_corpus.SOLO_BREED]
    assert sorted(solo["subset"]) == ["train", "val"]
    assert {odd[case] for case in ("cmyk_jpeg", "huge_jpeg", "png_named_jpg")} <= set(split["path"])
    assert len(list((run_dir / "converted").iterdir())) == 4

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["num_train"] + summary["num_val"] == len(split)
    facts = saved_model.read_metadata(summary["export"])
    assert facts["class_names"] == sorted(bad_corpus.GOOD_BREEDS + (bad_corpus.SOLO_BREED,))

    # resuming re-checks the data and maps the saved split onto the same copies
    records, train_indices, val_indices = prepare.load_data(config, run_dir)
    assert len(records.paths) == len(split) and all(pathlib.Path(p).is_file() for p in records.paths)
    assert sum(str(run_dir / "converted") in path for path in records.paths) == 4
    # tools re-reading the run's split (evaluate, predict) find the same copies
    original, _, _ = data.read_split(run_dir / "split.csv", root)
    assert validation.with_converted_copies(original, run_dir / "converted").paths == records.paths


def test_strict_training_stops_before_any_work_and_names_the_problems(corpus, tmp_path):
    config = small_config(data=None, data_dir=str(corpus[0]), strict=True, output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    with pytest.raises(data.DataError, match="strict: .* would skip data") as error:
        training_loop.train(config)
    assert "train/missing-photo.jpg" in str(error.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("overrides, key", [
    (dict(model="vgg16"), "model"),
    (dict(epochs=-1), "epochs"),
    (dict(model="resnet18", image_size=16), "image_size"),
    (dict(model="lenet5", image_size=24), "image_size"),
    (dict(strict="yes"), "strict"),
])
def test_bad_configuration_is_rejected_before_any_work_naming_the_key(tmp_path, overrides, key):
    values = {**small_config(output=str(tmp_path / "run"), export_dir=str(tmp_path / "export")), **overrides}
    if values["model"] != "lenet5":
        values.update(weights="none", strategy="scratch")
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'") as error:
        training_loop.train(values)
    assert "allowed values" in str(error.value) or "must be" in str(error.value) or "needs" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder_is_rejected_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made inside a file, even by root
    config = small_config(output=str(blocker / "run"), export_dir=str(tmp_path / "export"))
    with pytest.raises(config_lib.ConfigError, match="'output'.*cannot write"):
        training_loop.train(config)
    assert not (tmp_path / "export").exists()


def tiny_photo(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, format="JPEG")


def kaggle_folder(root, rows):
    """labels.csv and train/<id>.jpg, one small photo of its own colour per (id, breed) row."""
    for index, (image_id, _) in enumerate(rows):
        tiny_photo(root / "train" / f"{image_id}.jpg", (index * 37 % 256, index * 91 % 256, 128))
    (root / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{b}\n" for i, b in rows))
    return root


def test_breed_names_that_differ_only_in_case_or_separators_are_reported_and_refused_by_strict(tmp_path, capsys):
    rows = [("a", "Beagle"), ("b", "BEAGLE"), ("c", "beagle"), ("d", "beagle"), ("e", "golden retriever"),
            ("f", "golden_retriever"), ("g", "Golden-Retriever"), ("h", "pug")]
    root = kaggle_folder(tmp_path / "data", rows)
    report_path = tmp_path / "problems.csv"
    assert check.main(["--data-dir", str(root), "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    listed = pd.read_csv(report_path, keep_default_na=False)
    similar = listed[listed["kind"] == "similar-breed-names"]
    assert len(similar) == 6 and set(similar["action"]) == {"kept"}
    beagles = "'BEAGLE' (1 photo) and 'Beagle' (1 photo) and 'beagle' (2 photos)"
    assert all(beagles in reason for reason in similar["reason"] if "eagle" in reason.split("'")[1])
    summary = out.strip().splitlines()[-1]
    assert "2 probable duplicate breed names" in summary and beagles in summary
    assert "'Golden-Retriever' (1 photo) and 'golden retriever' (1 photo) and 'golden_retriever' (1 photo)" in summary

    assert check.main(["--data-dir", str(root), "--strict"]) == 2
    assert "differ only in case, spaces, hyphens or underscores" in capsys.readouterr().err
    assert validation.comparable_breed_name("Golden  Retriever") == validation.comparable_breed_name("golden-retriever")
    assert validation.comparable_breed_name("beagle") != validation.comparable_breed_name("beagles")


def test_photos_in_sub_folders_of_a_breed_folder_are_used(tmp_path):
    root = tmp_path / "data"
    tiny_photo(root / "beagle" / "top.jpg", (200, 0, 0))
    tiny_photo(root / "beagle" / "2019" / "a.jpg", (190, 0, 0))
    tiny_photo(root / "beagle" / "2019" / "summer" / "b.jpg", (180, 0, 0))
    tiny_photo(root / "beagle" / ".thumbnails" / "c.jpg", (0, 0, 0))  # hidden: not photos of the data set
    tiny_photo(root / "pug" / "only-nested" / "d.jpg", (0, 200, 0))
    tiny_photo(root / "pug" / "only-nested" / "e.jpg", (0, 190, 0))
    report = validation.check_data(root)
    relative = [pathlib.Path(path).relative_to(root).as_posix() for path in report.records.paths]
    assert relative == ["beagle/2019/a.jpg", "beagle/2019/summer/b.jpg", "beagle/top.jpg",
                        "pug/only-nested/d.jpg", "pug/only-nested/e.jpg"]
    assert report.records.class_names == ["beagle", "pug"]
    assert list(report.records.labels) == [0, 0, 0, 1, 1]


def test_report_into_a_folder_that_does_not_exist_yet(tmp_path, capsys):
    root = kaggle_folder(tmp_path / "data", [("a", "beagle"), ("b", "pug")])
    report_path = tmp_path / "reports" / "nested" / "x.csv"
    assert check.main(["--data-dir", str(root), "--report", str(report_path)]) == 0
    assert report_path.read_text().startswith("file,line,kind,action,reason")
    assert [path.name for path in report_path.parent.iterdir()] == ["x.csv"]  # no temporary file left


def test_ids_written_with_jpg_get_a_hint(tmp_path):
    root = kaggle_folder(tmp_path / "data", [("a", "beagle"), ("b", "pug")])
    (root / "labels.csv").write_text("id,breed\na.jpg,beagle\nb,pug\n")
    _, problems = data.scan_records(root)
    [missing] = [problem for problem in problems if problem.kind == "missing"]
    assert missing.file == "train/a.jpg.jpg"
    assert "ids are file names without .jpg and train/a.jpg exists, so the id should read 'a'" in missing.reason


@pytest.mark.parametrize("rows, named", [
    ([("a", "beagle"), ("b", "beagle"), ("c", "beagle")], "one breed ('beagle' (3 photos))"),
    ([("a", "beagle"), ("b", "beagle"), ("c", "pug"), ("d", "boxer")], "breeds 'boxer', 'pug' in"),
])
def test_fewer_than_two_breeds_or_a_breed_without_a_validation_photo_is_refused_before_any_work(
        tmp_path, rows, named):
    root = kaggle_folder(tmp_path / "data", rows)
    config = small_config(data=None, data_dir=str(root), batch_size=2, output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    with pytest.raises(data.DataError) as error:
        training_loop.train(config)
    assert named in str(error.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()
