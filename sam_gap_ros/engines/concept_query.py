"""Concept-query grammar and the set logic that evaluates it on instance masks.

A concept is either a plain noun phrase, passed to SAM3 as it is, or a small composition
of noun phrases::

    query    := clause ( EXCLUDE clause )*
    clause   := phrase ( 'near' phrase )*
    EXCLUDE  := 'but not' | 'and not'
    phrase   := word+            (words other than the operator words below)
    word     := letters/digits, optionally joined by inner '-' or "'" (e.g. half-eaten)

Semantics (every result instance is an instance of the clause's first phrase, so it keeps
that detection's mask, box and score; its ``concept`` is the query's canonical text):

* ``A near B``: instances of A whose mask comes within ``near_distance_px`` pixels (
  Euclidean distance between pixel centres; 0 when they overlap) of ANY instance of B.
  ``A near B near C`` must be near a B and near a C.
* ``X but not Y``: instances of X minus those that overlap an instance of Y by
  ``max(IoU, fraction of the X mask inside Y) >= exclusion_iou``. Chains are
  left-associative: ``A but not B but not C`` = (A - B) - C.
* ``near`` binds tighter than ``but not``: ``A near B but not C`` = (A near B) - C and
  ``A but not B near C`` = A - (B near C).

Text is Unicode-, case- and space-insensitive (NFKC-normalised, so decomposed accents and
full-width letters read as the usual ones; lower-cased; runs of whitespace collapsed); that
canonical text is what de-duplicates concepts and what ``Instance.concept`` reports, with
``and not`` written as ``but not``. The base phrases of all queries are what the text
encoder sees: ``apple but not green apple`` costs two phrase embeddings, shared with any
other query that uses the same phrases.

Rejected with ``ConceptError`` (message says what and where): empty text, more than 128
characters (canonical text) or 16 distinct concepts (counted after de-duplication), a
non-string, characters other than words (``( ) , & | !`` ...), an operator with a missing
side (``near trunk``, ``apple but not``), two operators in a row, double negation
(``but not not``), ``not`` without ``but``/``and``, ``and``/``but`` without ``not``, and
the unsupported operators ``or``, ``nor``, ``except``, ``unless``, ``xor``.

Duplicates across all concepts of a frame are resolved by :func:`resolve_duplicates`: of
two instances whose masks overlap with IoU > ``duplicate_iou`` (default 0.7) only the
higher-scoring one is kept (on equal scores, the one listed first, i.e. the earlier concept).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import re
import unicodedata
from typing import Dict, List, Mapping, Sequence, Tuple

import cv2
import numpy as np

from sam_gap_ros.engines.types import ConceptError, Instance
from sam_gap_ros.mask_ops import mask_to_box

MAX_CONCEPTS = 16
MAX_CONCEPT_CHARS = 128
MAX_PHRASES = 32
"""Most distinct base phrases a concept set may use (each costs one detector pass)."""

EXCLUDE = 'but not'
NEAR = 'near'
UNSUPPORTED_OPERATORS = ('or', 'nor', 'except', 'unless', 'xor')

_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_BAD_CHAR = re.compile(r"[^\w\s'\-]|_")


@dataclass(frozen=True)
class Clause:
    """A phrase, optionally restricted to instances near other phrases."""

    subject: str
    near: Tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """Return the canonical text of the clause."""
        return f' {NEAR} '.join((self.subject,) + self.near)


@dataclass(frozen=True)
class ConceptQuery:
    """A parsed concept: an including clause minus zero or more excluded clauses."""

    include: Clause
    exclude: Tuple[Clause, ...] = ()

    @property
    def text(self) -> str:
        """Return the canonical query string: lower case, single spaces, 'but not'."""
        return f' {EXCLUDE} '.join(c.text for c in (self.include,) + self.exclude)

    @property
    def phrases(self) -> Tuple[str, ...]:
        """Return the distinct base phrases of the query, in order of appearance."""
        ordered: List[str] = []
        for clause in (self.include,) + self.exclude:
            ordered += [clause.subject, *clause.near]
        return tuple(dict.fromkeys(ordered))

    @property
    def is_plain(self) -> bool:
        """Whether the query is a single noun phrase without operators."""
        return not self.exclude and not self.include.near


def normalize_text(text: str) -> str:
    """Return ``text`` NFKC-normalised, lower-cased, with whitespace runs collapsed.

    NFKC first: a decomposed 'a' + combining diaeresis (as macOS and some keyboards send
    it) becomes the letter 'ä', and full-width letters and spaces (CJK input methods)
    become ASCII, so they pass the word check and spell the operators.
    """
    return ' '.join(unicodedata.normalize('NFKC', text).lower().split())


def _tokens(text: str, where: str) -> List[str]:
    """Split canonical text into phrases (str) and the operators EXCLUDE / NEAR."""
    bad = _BAD_CHAR.search(text)
    if bad:
        raise ConceptError(f"{where}: unsupported character {bad.group()!r}; use plain words and "
                           f"the operators 'but not', 'and not', 'near'")
    words = text.split(' ')
    tokens: List[str] = []
    phrase: List[str] = []

    def operator(op: str) -> None:
        if phrase:
            tokens.append(' '.join(phrase))
            phrase.clear()
        tokens.append(op)

    index = 0
    while index < len(words):
        word = words[index]
        if not _WORD.fullmatch(word):
            raise ConceptError(f"{where}: '{word}' is not a word (letters/digits, inner - or ')")
        following = words[index + 1] if index + 1 < len(words) else None
        if word in ('but', 'and'):
            if following != 'not':
                raise ConceptError(
                    f"{where}: '{word}' is only an operator as '{word} not' (exclusion); for a "
                    f'union give the phrases as separate concepts')
            if index + 2 < len(words) and words[index + 2] == 'not':
                raise ConceptError(f"{where}: double negation '{word} not not' is not supported")
            operator(EXCLUDE)
            index += 2
            continue
        if word == 'not':
            raise ConceptError(f"{where}: 'not' must follow 'but' or 'and' "
                               "(e.g. 'apple but not green apple')")
        if word in UNSUPPORTED_OPERATORS:
            raise ConceptError(f"{where}: unknown operator '{word}'; supported operators are "
                               "'but not', 'and not' and 'near'")
        if word == NEAR:
            operator(NEAR)
        else:
            phrase.append(word)
        index += 1
    if phrase:
        tokens.append(' '.join(phrase))
    return tokens


def parse_query(text: str) -> ConceptQuery:
    """Parse one concept string into a :class:`ConceptQuery`; raise ConceptError if invalid."""
    if not isinstance(text, str):
        raise ConceptError(f'a concept must be a string, got {type(text).__name__}')
    canonical = normalize_text(text)
    if not canonical:
        raise ConceptError('a concept must not be empty or whitespace')
    if len(canonical) > MAX_CONCEPT_CHARS:
        raise ConceptError(f"concept '{canonical[:32]}...' has {len(canonical)} characters; "
                           f'at most {MAX_CONCEPT_CHARS} are allowed')
    where = f"concept '{canonical}'"
    tokens = _tokens(canonical, where)
    operators = (EXCLUDE, NEAR)
    for position, token in enumerate(tokens):
        if token not in operators:
            continue
        if position == 0:
            raise ConceptError(f"{where}: starts with operator '{token}' (nothing to apply it to)")
        if position == len(tokens) - 1:
            raise ConceptError(f"{where}: operator '{token}' at the end has no phrase after it")
        if tokens[position + 1] in operators:
            raise ConceptError(f"{where}: operators '{token}' and '{tokens[position + 1]}' "
                               'follow each other without a phrase between them')
    clauses: List[Clause] = []
    for part in _split(tokens, EXCLUDE):
        phrases = [p for p in part if p != NEAR]
        clauses.append(Clause(phrases[0], tuple(phrases[1:])))
    return ConceptQuery(clauses[0], tuple(clauses[1:]))


def _split(tokens: Sequence[str], separator: str) -> List[List[str]]:
    parts: List[List[str]] = [[]]
    for token in tokens:
        if token == separator:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def parse_concepts(concepts: Sequence[str], max_concepts: int = MAX_CONCEPTS,
                   max_phrases: int = MAX_PHRASES) -> List[ConceptQuery]:
    """Validate and parse a concept list; drop case/space-insensitive duplicates (first wins).

    Raises ConceptError for anything invalid; nothing is partially accepted.
    """
    if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Sequence):
        raise ConceptError(f'concepts must be a list of strings, got {type(concepts).__name__}')
    if len(concepts) == 0:
        raise ConceptError('the concept set is empty: give at least one concept')
    queries: Dict[str, ConceptQuery] = {}
    for number, concept in enumerate(concepts):
        if not isinstance(concept, str):
            raise ConceptError(f'concept #{number} is a {type(concept).__name__}, not a string')
        try:
            query = parse_query(concept)
        except ConceptError as exc:
            raise ConceptError(f'concept #{number}: {exc}') from None
        queries.setdefault(query.text, query)
    # Counted after de-duplication: 'apple' sent 17 times is one concept.
    if len(queries) > max_concepts:
        raise ConceptError(f'{len(queries)} distinct concepts given; at most {max_concepts} '
                           'are allowed')
    parsed = list(queries.values())
    phrases = base_phrases(parsed)
    if len(phrases) > max_phrases:
        raise ConceptError(f'the concepts use {len(phrases)} distinct phrases; at most '
                           f'{max_phrases} are allowed')
    return parsed


def base_phrases(queries: Sequence[ConceptQuery]) -> List[str]:
    """Return the distinct base phrases of all queries, in order of first appearance."""
    return list(dict.fromkeys(p for q in queries for p in q.phrases))


# ----------------------------------------------------------------------------- set logic


def mask_distances(masks: Sequence[np.ndarray], others: Sequence[np.ndarray],
                   max_distance: float) -> np.ndarray:
    """Return, per mask, the pixel distance to the nearest pixel of any of ``others``.

    Distances are Euclidean between pixel centres (0 where masks overlap, 1 for touching
    neighbours); values beyond ``max_distance`` are only guaranteed to be
    ``> max_distance`` (the search is cropped for speed); ``inf`` when there is nothing
    to measure to, or the mask is empty.
    """
    result = np.full(len(masks), np.inf)
    if not masks or not others:
        return result
    union = np.logical_or.reduce([np.asarray(m, dtype=bool) for m in others])
    if not union.any():
        return result
    height, width = union.shape
    margin = int(np.ceil(max(max_distance, 0.0))) + 1
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != union.shape:
            raise ValueError(f'mask shape {mask.shape} differs from {union.shape}')
        box = mask_to_box(mask)
        if box is None:
            continue
        # Pixels more than max_distance outside the mask's box cannot change the answer.
        x0, y0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
        x1, y1 = min(width, int(box[2]) + margin), min(height, int(box[3]) + margin)
        crop = union[y0:y1, x0:x1]
        if not crop.any():
            continue
        # distanceTransform measures to the nearest zero pixel, i.e. nearest pixel of others.
        dist = cv2.distanceTransform((~crop).astype(np.uint8), cv2.DIST_L2,
                                     cv2.DIST_MASK_PRECISE)
        result[index] = float(dist[mask[y0:y1, x0:x1]].min())
    return result


def near_any(masks: Sequence[np.ndarray], others: Sequence[np.ndarray],
             distance_px: float) -> np.ndarray:
    """Return a bool keep-array: which masks lie within ``distance_px`` of any of ``others``."""
    if distance_px < 0:
        raise ValueError(f'distance_px must be >= 0, got {distance_px}')
    # distanceTransform measures in float32: a mask exactly at the limit comes back up to a
    # rounding step above it (sqrt(5) rounds up; OpenCV 4.5 returns 7.0000005 for 7).
    limit = np.float32(distance_px)
    return mask_distances(masks, others, distance_px) <= float(limit + 4 * np.spacing(limit))


def mask_overlaps(masks_a: Sequence[np.ndarray], masks_b: Sequence[np.ndarray]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(iou, coverage)`` matrices of shape ``(len(a), len(b))``.

    ``coverage[i, j]`` is the fraction of ``masks_a[i]`` inside ``masks_b[j]``. Only pairs
    whose boxes intersect are compared, on the intersection crop, so memory stays at one
    crop (a dense matmul over full-resolution masks would need ``N x H x W`` floats).
    """
    iou = np.zeros((len(masks_a), len(masks_b)))
    coverage = np.zeros_like(iou)
    boxes_b = [mask_to_box(m) for m in masks_b]
    areas_b = [int(np.count_nonzero(m)) for m in masks_b]
    for i, mask in enumerate(masks_a):
        box_a = mask_to_box(mask)
        if box_a is None:
            continue
        area_a = int(np.count_nonzero(mask))
        for j, other in enumerate(masks_b):
            box_b = boxes_b[j]
            if box_b is None:
                continue
            x0, y0 = int(max(box_a[0], box_b[0])), int(max(box_a[1], box_b[1]))
            x1, y1 = int(min(box_a[2], box_b[2])), int(min(box_a[3], box_b[3]))
            if x1 <= x0 or y1 <= y0:
                continue
            inter = int(np.count_nonzero(mask[y0:y1, x0:x1] & other[y0:y1, x0:x1]))
            iou[i, j] = inter / (area_a + areas_b[j] - inter)
            coverage[i, j] = inter / area_a
    return iou, coverage


def overlapping_any(masks: Sequence[np.ndarray], others: Sequence[np.ndarray],
                    threshold: float) -> np.ndarray:
    """Return a bool array: which masks overlap one of ``others`` by at least ``threshold``.

    Overlap is ``max(IoU, fraction of the mask inside the other)``, so a detection is also
    caught when the excluded detection is the larger, enclosing one. Empty masks never
    overlap anything.
    """
    if not masks or not others:
        return np.zeros(len(masks), dtype=bool)
    iou, coverage = mask_overlaps(masks, others)
    return (np.maximum(iou, coverage) >= threshold).any(axis=1)


def evaluate_query(query: ConceptQuery, detections: Mapping[str, Sequence[Instance]], *,
                   exclusion_iou: float = 0.5, near_distance_px: float = 20.0) -> List[Instance]:
    """Apply a query's set logic to per-phrase detections; return the kept instances.

    ``detections`` maps every base phrase of the query to its instances. Results are
    copies of the first phrase's instances with ``concept`` set to the query text.
    """
    missing = [p for p in query.phrases if p not in detections]
    if missing:
        raise ValueError(f"no detections given for phrase(s) {missing} of '{query.text}'")

    def clause_instances(clause: Clause) -> List[Instance]:
        found = list(detections[clause.subject])
        for other in clause.near:
            keep = near_any([i.mask for i in found], [i.mask for i in detections[other]],
                            near_distance_px)
            found = [i for i, k in zip(found, keep, strict=True) if k]
        return found

    kept = clause_instances(query.include)
    for clause in query.exclude:
        excluded = clause_instances(clause)
        hit = overlapping_any([i.mask for i in kept], [i.mask for i in excluded], exclusion_iou)
        kept = [i for i, h in zip(kept, hit, strict=True) if not h]
    return [replace(i, concept=query.text) for i in kept]


def resolve_duplicates(instances: Sequence[Instance], iou_threshold: float = 0.7
                       ) -> List[Instance]:
    """Drop instances whose mask IoU with a higher-scoring kept one exceeds ``iou_threshold``.

    Returns the kept instances by descending score; equal scores keep input order, so the
    earlier concept wins a tie.
    """
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)
    masks = [instances[i].mask for i in order]
    iou, _ = mask_overlaps(masks, masks)
    kept: List[int] = []
    for rank in range(len(order)):
        if all(iou[rank, other] <= iou_threshold for other in kept):
            kept.append(rank)
    return [instances[order[rank]] for rank in kept]


__all__ = ['Clause', 'ConceptQuery', 'EXCLUDE', 'MAX_CONCEPTS', 'MAX_CONCEPT_CHARS',
           'MAX_PHRASES', 'NEAR', 'UNSUPPORTED_OPERATORS', 'base_phrases', 'evaluate_query',
           'mask_distances', 'mask_overlaps', 'near_any', 'normalize_text', 'overlapping_any',
           'parse_concepts', 'parse_query', 'resolve_duplicates']
