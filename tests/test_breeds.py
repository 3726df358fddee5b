"""Kaggle breed names and their ImageNet-1k indices."""

import pytest

from tfdogs.data.breeds import IMAGENET_INDEX, KAGGLE_BREEDS, imagenet_index


def test_kaggle_breeds_are_the_120_sorted_names():
    assert len(KAGGLE_BREEDS) == 120 == len(set(KAGGLE_BREEDS))
    assert list(KAGGLE_BREEDS) == sorted(KAGGLE_BREEDS)
    assert KAGGLE_BREEDS[:3] == ("affenpinscher", "afghan_hound", "african_hunting_dog")
    assert KAGGLE_BREEDS[-1] == "yorkshire_terrier"


def test_every_breed_has_a_distinct_imagenet_class():
    assert set(IMAGENET_INDEX) == set(KAGGLE_BREEDS)
    indices = list(IMAGENET_INDEX.values())
    assert len(set(indices)) == 120
    assert set(indices) == (set(range(151, 269)) - {251}) | {273, 274, 275}


@pytest.mark.parametrize(
    "breed, index",
    [
        ("chihuahua", 151),
        ("japanese_spaniel", 152),
        ("maltese_dog", 153),
        ("shih-tzu", 155),
        ("black-and-tan_coonhound", 165),
        ("golden_retriever", 207),
        ("german_shepherd", 235),
        ("affenpinscher", 252),
        ("mexican_hairless", 268),
        ("dingo", 273),
        ("dhole", 274),
        ("african_hunting_dog", 275),
    ],
)
def test_spot_checks(breed, index):
    assert IMAGENET_INDEX[breed] == index
    assert imagenet_index(breed) == index


@pytest.mark.parametrize("spelling", ["Golden Retriever", "golden-retriever", "GOLDEN_RETRIEVER", " golden retriever "])
def test_imagenet_index_is_tolerant_to_spelling(spelling):
    assert imagenet_index(spelling) == 207


def test_hyphenated_kaggle_names_accept_spaces():
    assert imagenet_index("Shih Tzu") == 155
    assert imagenet_index("wire haired fox terrier") == imagenet_index("wire-haired_fox_terrier") == 188


def test_unknown_breed_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="dalmatian"):
        imagenet_index("dalmatian")  # an ImageNet dog, but not a Kaggle class
