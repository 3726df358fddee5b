"""The 120 Kaggle dog breeds and their ImageNet-1k class indices.

Kaggle's dog-breed-identification labels come from Stanford Dogs, which was
cut from ImageNet: every breed is one ImageNet-1k class. The mapping is built
by matching the Kaggle names against the WordNet lemmas of the ImageNet-1k
classes 151-275 (the dog, wolf and wild-dog block), listed below as in the
standard ``synset_words.txt``; the 120 matches are indices 151-268 except 251
(dalmatian, absent from Kaggle), plus 273-275 (dingo, dhole, African hunting
dog).

A breed that ImageNet splits into several classes (``poodle``: toy, miniature
and standard) is the union of them (`imagenet_classes`), so that class-folder
data sets named by common breed names get a zero-shot baseline and an
ImageNet head too.

Example:
    >>> imagenet_index("Golden Retriever")
    207
    >>> imagenet_classes("poodle")
    (265, 266, 267)
"""

import re

# sample_submission.csv column order, which is sorted.
KAGGLE_BREEDS = (
    "affenpinscher", "afghan_hound", "african_hunting_dog", "airedale", "american_staffordshire_terrier",
    "appenzeller", "australian_terrier", "basenji", "basset", "beagle", "bedlington_terrier",
    "bernese_mountain_dog", "black-and-tan_coonhound", "blenheim_spaniel", "bloodhound", "bluetick",
    "border_collie", "border_terrier", "borzoi", "boston_bull", "bouvier_des_flandres", "boxer",
    "brabancon_griffon", "briard", "brittany_spaniel", "bull_mastiff", "cairn", "cardigan",
    "chesapeake_bay_retriever", "chihuahua", "chow", "clumber", "cocker_spaniel", "collie",
    "curly-coated_retriever", "dandie_dinmont", "dhole", "dingo", "doberman", "english_foxhound",
    "english_setter", "english_springer", "entlebucher", "eskimo_dog", "flat-coated_retriever",
    "french_bulldog", "german_shepherd", "german_short-haired_pointer", "giant_schnauzer", "golden_retriever",
    "gordon_setter", "great_dane", "great_pyrenees", "greater_swiss_mountain_dog", "groenendael",
    "ibizan_hound", "irish_setter", "irish_terrier", "irish_water_spaniel", "irish_wolfhound",
    "italian_greyhound", "japanese_spaniel", "keeshond", "kelpie", "kerry_blue_terrier", "komondor",
    "kuvasz", "labrador_retriever", "lakeland_terrier", "leonberg", "lhasa", "malamute", "malinois",
    "maltese_dog", "mexican_hairless", "miniature_pinscher", "miniature_poodle", "miniature_schnauzer",
    "newfoundland", "norfolk_terrier", "norwegian_elkhound", "norwich_terrier", "old_english_sheepdog",
    "otterhound", "papillon", "pekinese", "pembroke", "pomeranian", "pug", "redbone", "rhodesian_ridgeback",
    "rottweiler", "saint_bernard", "saluki", "samoyed", "schipperke", "scotch_terrier", "scottish_deerhound",
    "sealyham_terrier", "shetland_sheepdog", "shih-tzu", "siberian_husky", "silky_terrier",
    "soft-coated_wheaten_terrier", "staffordshire_bullterrier", "standard_poodle", "standard_schnauzer",
    "sussex_spaniel", "tibetan_mastiff", "tibetan_terrier", "toy_poodle", "toy_terrier", "vizsla",
    "walker_hound", "weimaraner", "welsh_springer_spaniel", "west_highland_white_terrier", "whippet",
    "wire-haired_fox_terrier", "yorkshire_terrier",
)  # fmt: skip

# ImageNet-1k classes 151-275: WordNet id and lemmas, one class per line, in index order.
_FIRST_INDEX = 151
_IMAGENET_SYNSETS = """\
n02085620 Chihuahua
n02085782 Japanese spaniel
n02085936 Maltese dog, Maltese terrier, Maltese
n02086079 Pekinese, Pekingese, Peke
n02086240 Shih-Tzu
n02086646 Blenheim spaniel
n02086910 papillon
n02087046 toy terrier
n02087394 Rhodesian ridgeback
n02088094 Afghan hound, Afghan
n02088238 basset, basset hound
n02088364 beagle
n02088466 bloodhound, sleuthhound
n02088632 bluetick
n02089078 black-and-tan coonhound
n02089867 Walker hound, Walker foxhound
n02089973 English foxhound
n02090379 redbone
n02090622 borzoi, Russian wolfhound
n02090721 Irish wolfhound
n02091032 Italian greyhound
n02091134 whippet
n02091244 Ibizan hound, Ibizan Podenco
n02091467 Norwegian elkhound, elkhound
n02091635 otterhound, otter hound
n02091831 Saluki, gazelle hound
n02092002 Scottish deerhound, deerhound
n02092339 Weimaraner
n02093256 Staffordshire bullterrier, Staffordshire bull terrier
n02093428 American Staffordshire terrier, Staffordshire terrier, American pit bull terrier, pit bull terrier
n02093647 Bedlington terrier
n02093754 Border terrier
n02093859 Kerry blue terrier
n02093991 Irish terrier
n02094114 Norfolk terrier
n02094258 Norwich terrier
n02094433 Yorkshire terrier
n02095314 wire-haired fox terrier
n02095570 Lakeland terrier
n02095889 Sealyham terrier, Sealyham
n02096051 Airedale, Airedale terrier
n02096177 cairn, cairn terrier
n02096294 Australian terrier
n02096437 Dandie Dinmont, Dandie Dinmont terrier
n02096585 Boston bull, Boston terrier
n02097047 miniature schnauzer
n02097130 giant schnauzer
n02097209 standard schnauzer
n02097298 Scotch terrier, Scottish terrier, Scottie
n02097474 Tibetan terrier, chrysanthemum dog
n02097658 silky terrier, Sydney silky
n02098105 soft-coated wheaten terrier
n02098286 West Highland white terrier
n02098413 Lhasa, Lhasa apso
n02099267 flat-coated retriever
n02099429 curly-coated retriever
n02099601 golden retriever
n02099712 Labrador retriever
n02099849 Chesapeake Bay retriever
n02100236 German short-haired pointer
n02100583 vizsla, Hungarian pointer
n02100735 English setter
n02100877 Irish setter, red setter
n02101006 Gordon setter
n02101388 Brittany spaniel
n02101556 clumber, clumber spaniel
n02102040 English springer, English springer spaniel
n02102177 Welsh springer spaniel
n02102318 cocker spaniel, English cocker spaniel, cocker
n02102480 Sussex spaniel
n02102973 Irish water spaniel
n02104029 kuvasz
n02104365 schipperke
n02105056 groenendael
n02105162 malinois
n02105251 briard
n02105412 kelpie
n02105505 komondor
n02105641 Old English sheepdog, bobtail
n02105855 Shetland sheepdog, Shetland sheep dog, Shetland
n02106030 collie
n02106166 Border collie
n02106382 Bouvier des Flandres, Bouviers des Flandres
n02106550 Rottweiler
n02106662 German shepherd, German shepherd dog, German police dog, alsatian
n02107142 Doberman, Doberman pinscher
n02107312 miniature pinscher
n02107574 Greater Swiss Mountain dog
n02107683 Bernese mountain dog
n02107908 Appenzeller
n02108000 EntleBucher
n02108089 boxer
n02108422 bull mastiff
n02108551 Tibetan mastiff
n02108915 French bulldog
n02109047 Great Dane
n02109525 Saint Bernard, St Bernard
n02109961 Eskimo dog, husky
n02110063 malamute, malemute, Alaskan malamute
n02110185 Siberian husky
n02110341 dalmatian, coach dog, carriage dog
n02110627 affenpinscher, monkey pinscher, monkey dog
n02110806 basenji
n02110958 pug, pug-dog
n02111129 Leonberg
n02111277 Newfoundland, Newfoundland dog
n02111500 Great Pyrenees
n02111889 Samoyed, Samoyede
n02112018 Pomeranian
n02112137 chow, chow chow
n02112350 keeshond
n02112706 Brabancon griffon
n02113023 Pembroke, Pembroke Welsh corgi
n02113186 Cardigan, Cardigan Welsh corgi
n02113624 toy poodle
n02113712 miniature poodle
n02113799 standard poodle
n02113978 Mexican hairless
n02114367 timber wolf, grey wolf, gray wolf, Canis lupus
n02114548 white wolf, Arctic wolf, Canis lupus tundrarum
n02114712 red wolf, maned wolf, Canis rufus, Canis niger
n02114855 coyote, prairie wolf, brush wolf, Canis latrans
n02115641 dingo, warrigal, warragal, Canis dingo
n02115913 dhole, Cuon alpinus
n02116738 African hunting dog, hyena dog, Cape hunting dog, Lycaon pictus
"""


def _normalise(name):
    """``"Golden Retriever"``, ``"golden-retriever"`` -> ``"golden_retriever"``."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower())


def _build_index():
    lemma_to_index = {}
    for offset, line in enumerate(_IMAGENET_SYNSETS.splitlines()):
        _wnid, lemmas = line.split(" ", 1)
        for lemma in lemmas.split(", "):
            lemma_to_index.setdefault(_normalise(lemma), _FIRST_INDEX + offset)
    unmatched = [breed for breed in KAGGLE_BREEDS if _normalise(breed) not in lemma_to_index]
    if unmatched:
        raise RuntimeError(f"Kaggle breeds without an ImageNet class: {unmatched}")
    return {breed: lemma_to_index[_normalise(breed)] for breed in KAGGLE_BREEDS}


IMAGENET_INDEX = _build_index()
_BY_NORMALISED_NAME = {_normalise(breed): index for breed, index in IMAGENET_INDEX.items()}


def imagenet_index(breed):
    """The ImageNet-1k class index of a Kaggle breed.

    Args:
        breed: a breed name, in any case, with spaces, hyphens or underscores
            (``"Golden Retriever"``, ``"golden-retriever"``, ``"shih_tzu"``).

    Returns:
        The index, 0-999, into ImageNet-1k logits.

    Raises:
        KeyError: naming ``breed`` when it is not one of `KAGGLE_BREEDS`.
    """
    try:
        return _BY_NORMALISED_NAME[_normalise(breed)]
    except KeyError:
        raise KeyError(f"{breed!r} is not one of the 120 Kaggle dog breeds.") from None


# ImageNet-1k's 118 domestic dog classes (Chihuahua .. Mexican hairless).
IMAGENET_DOG_CLASSES = tuple(range(151, 269))

# Common breed names that ImageNet-1k splits into several classes: the breed is their union.
BREED_GROUPS = {"poodle": ("toy_poodle", "miniature_poodle", "standard_poodle")}


def imagenet_classes(breed):
    """The ImageNet-1k class indices of a breed: one for a Kaggle breed, several for a `BREED_GROUPS` name.

    Raises:
        KeyError: naming ``breed`` when ImageNet-1k has no class of it.
    """
    group = BREED_GROUPS.get(_normalise(breed))
    if group is not None:
        return tuple(imagenet_index(member) for member in group)
    return (imagenet_index(breed),)
