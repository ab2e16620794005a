"""The 1000 ImageNet-1K (ILSVRC-2012) classes and the folder-name -> logit mapping.

``imagenet_wnids.txt`` holds the WordNet ids in the standard sorted order that every
ImageNet-1K checkpoint uses: line i is class i (n01440764 "tench" is 0, n15075141 "toilet
tissue" is 999).  ``imagenet_class_names.txt`` holds, on the same line, the synset's WordNet
lemmas (comma separated, the common name first; two pairs of classes share a first lemma:
"crane" 134/517 and "maillot" 638/639).  The data is the published ILSVRC-2012
``LOC_synset_mapping.txt``, cross-checked against Keras' ``imagenet_class_index.json``.
"""

from __future__ import annotations

from importlib import resources

from .errors import ImageDataError

NUM_IMAGENET_CLASSES = 1000


def _read_lines(name: str) -> list[str]:
    text = resources.files(__package__).joinpath(name).read_text(encoding="ascii")
    return [line for line in text.split("\n") if line]


IMAGENET_WNIDS: list[str] = _read_lines("imagenet_wnids.txt")
IMAGENET_CLASS_NAMES: list[str] = _read_lines("imagenet_class_names.txt")
_WNID_INDEX: dict[str, int] = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}

# Internal invariants of the shipped files (a packaging mistake, not a user error).
assert len(IMAGENET_WNIDS) == len(_WNID_INDEX) == len(IMAGENET_CLASS_NAMES) == NUM_IMAGENET_CLASSES
assert IMAGENET_WNIDS == sorted(IMAGENET_WNIDS)


def class_to_index(folder_wnids: list[str], num_classes: int) -> dict[str, int]:
    """Map class-folder names to logit indices.

    If every name is an ImageNet-1K wnid, each gets its canonical index, so a folder holding
    only some classes (a partial val/, a subset of train/) still lands on the right logits;
    otherwise the sorted names are numbered 0, 1, ... (torchvision ``ImageFolder``'s rule).
    Raises ImageDataError when there are no names or they do not fit in ``num_classes``.
    """
    names = sorted(set(folder_wnids))
    if not names:
        raise ImageDataError("no class folders given; expected ImageNet wnids (n01440764, ...) or class names")
    if all(name in _WNID_INDEX for name in names):
        mapping = {name: _WNID_INDEX[name] for name in names}
        top = max(mapping, key=mapping.get)
        if mapping[top] >= num_classes:
            raise ImageDataError(
                f"class folder {top} is ImageNet-1K class {mapping[top]}, which does not fit in "
                f"vision.num_classes={num_classes}; expected vision.num_classes={NUM_IMAGENET_CLASSES} for "
                "ImageNet wnid folders (a subset of the classes still uses the canonical indices)"
            )
        return mapping
    if len(names) > num_classes:
        raise ImageDataError(
            f"{len(names)} class folders ({names[0]} ... {names[-1]}) do not fit in "
            f"vision.num_classes={num_classes}; expected at most {num_classes} folders"
        )
    return {name: i for i, name in enumerate(names)}
