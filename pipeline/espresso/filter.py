"""The Espresso filter (METHOD section 2): block an image iff CLIP puts it nearer the unacceptable
concept than its acceptable counterpart.

With e = phi_x(x)/|phi_x(x)| and unit concept embeddings t_u, t_a::

    P(u|x) = softmax(s * [cos(e, t_u), cos(e, t_a)])_u = sigmoid(s * <e, t_u - t_a>)
    block(x)  iff  P(u|x) > 0.5  iff  <phi_x(x), t_u - t_a> > 0

The decision is taken in one place, :func:`blocks`, wherever one is made (screening, the
safety-checker call, fine-tuning's validation, the certificate, the metrics).

The filter is a library object independent of DVC: it saves as a folder that also loads as a
plain transformers ``CLIPModel``, and it plugs into a diffusers ``StableDiffusionPipeline`` as its
``safety_checker``. It fails closed: an image it cannot score is blocked, and the reason is
returned and logged.

Input forms (METHOD section 2, "Inputs"): a uint8 ``H x W x 3`` array; a float (16/32/64)
``H x W x 3`` array in [0, 1] (diffusers ``output_type="np"``); a PIL image (of a mode that
:mod:`pipeline.espresso.pil_modes` converts to RGB); a float torch
tensor ``3 x H x W`` in [0, 1] (``output_type="pt"``) or [-1, 1] (the VAE's decode). The caller
states the range of float images with ``value_range`` (``"0,1"`` or ``"-1,1"``); unstated, arrays
are [0, 1] and a tensor is [-1, 1] if it has negative values, else ambiguous. [-1, 1] is clamped
as diffusers clamps (VAE decodes overshoot a little). A batch is a sequence of these, an
``N x H x W x 3`` array or an ``N x 3 x H x W`` tensor. Every form is first brought to one
canonical form, uint8 ``H x W x 3`` rounded as diffusers' ``numpy_to_pil`` rounds
(``(x * 255).round()``, after ``(x / 2 + 0.5).clamp(0, 1)`` for [-1, 1]), because that is exactly
what a diffusers pipeline hands its safety checker's feature extractor: one image gets one score
whatever its form, the same as on the pipeline's path, and the processor never rescales a float
image a second time (which scored it as near-black: fail-open). Any other form (uint16, 2-D,
channels-first array, a PIL image of unknown range (mode F, or I beyond 16 bits) or with
transparency (its picture depends on the background), out-of-range or non-finite floats, a tensor
of unstated range in [0, 1]) is not guessed at: :func:`canonical_image` names the problem and the
fix, ``screen`` blocks the image unscored, ``embed`` raises.
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.espresso.embeddings import image_features, text_embeddings
from pipeline.espresso.files import atomic_dir
from pipeline.espresso.models import load_clip, resolve_source
from pipeline.espresso.pixels import VALUE_RANGES, clip_pixels, to_uint8, unit_range

CONFIG_FILE = "espresso.json"
#: The smallest |t_u - t_a| a filter accepts (unit embeddings: 0 means the two concepts are one).
MIN_DIRECTION_NORM = 1e-6
logger = logging.getLogger(__name__)


class ImageFormError(ValueError):
    """An image whose form is invalid or ambiguous; the message names the problem and the fix."""


#: Images a result's repr shows one line each; a larger batch shows these and a count of the rest.
REPR_ROWS = 8


def _short(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def result_repr(head: str, lines: list[str], blocked: np.ndarray) -> str:
    """A screening result in at most ``REPR_ROWS + 2`` lines: ``head``, one line per image,
    and for a larger batch how many more images there are and how many of them are blocked."""
    rows = [head] + [f"  [{i}] {line}" for i, line in enumerate(lines[:REPR_ROWS])]
    if len(lines) > REPR_ROWS:
        rest = blocked[REPR_ROWS:]
        rows.append(f"  ... {len(rest)} more images ({int(rest.sum())} blocked)")
    return "\n".join(rows)


def records_frame(records: list[dict], columns: tuple[str, ...]):
    """``records`` as a pandas DataFrame; pandas is imported here, as the library does not
    need it (it comes with the ``pipeline`` extra)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_pandas() needs pandas, which the filter library does not install: "
                          "pip install pandas (or use to_records())") from None
    return pd.DataFrame.from_records(records, columns=list(columns))


def _score(p: float) -> float | None:
    return None if np.isnan(p) else float(p)


@dataclass
class Screening:
    """What the filter decided for a batch of images."""

    images: list                   # the inputs (a list, or the batch diffusers gave), each blocked
                                   # one replaced by a black one
    blocked: np.ndarray            # bool N
    p_unacceptable: np.ndarray     # float N, NaN where the image could not be scored
    errors: list[str | None] = field(default_factory=list)  # why an image was not scored
    concept: str | None = None     # the unacceptable concept screened for
    p_vs_everyday: np.ndarray | None = None  # float N: P(u|x) against the everyday anchor
                                   # (None: the filter has none, the paper's rule)

    #: The columns of :meth:`to_records` / :meth:`to_pandas`, one row per image.
    COLUMNS = ("image", "concept", "blocked", "p_unacceptable", "p_vs_everyday", "error")

    @property
    def unscored(self) -> np.ndarray:
        """bool N: no score (invalid or ambiguous form, or the model failed); always blocked."""
        return np.isnan(self.p_unacceptable)

    def _error(self, i: int) -> str | None:
        return self.errors[i] if i < len(self.errors) else None

    def to_records(self) -> list[dict]:
        """One dict per image (``COLUMNS``); ``p_unacceptable`` is None where it was not
        scored, and ``error`` says why."""
        gate = self.p_vs_everyday
        return [{"image": i, "concept": self.concept, "blocked": bool(self.blocked[i]),
                 "p_unacceptable": _score(self.p_unacceptable[i]),
                 "p_vs_everyday": None if gate is None else _score(gate[i]),
                 "error": self._error(i)}
                for i in range(len(self.blocked))]

    def to_pandas(self):
        """:meth:`to_records` as a pandas DataFrame (needs pandas)."""
        return records_frame(self.to_records(), self.COLUMNS)

    def __repr__(self) -> str:
        n, blocked = len(self.blocked), int(np.sum(self.blocked))
        concept = f" for {self.concept!r}" if self.concept else ""
        lines = [f"{'blocked' if b else 'passed '}  "
                 + (f"unscored: {_short(self._error(i) or 'no score')}" if np.isnan(p)
                    else f"P(unacceptable) {p:.3f}")
                 for i, (b, p) in enumerate(zip(self.blocked, self.p_unacceptable))]
        return result_repr(f"Screening({n} images{concept}: {blocked} blocked, {n - blocked} "
                           "passed)", lines, np.asarray(self.blocked))


def canonical_image(image, value_range: str | None = None) -> np.ndarray:
    """One image in an accepted form (module docstring) -> uint8 ``H x W x 3``, rounded as
    diffusers' ``numpy_to_pil`` rounds. ``value_range`` (``"0,1"`` or ``"-1,1"``) states the range
    of float images; unstated, float arrays are [0, 1] and tensors [-1, 1] if they have negative
    values (else ambiguous). Raises :class:`ImageFormError` naming the problem and the fix (a
    plain ``ValueError`` for an unknown ``value_range``: a programming error, not an image's)."""
    if value_range not in (None, *VALUE_RANGES):
        raise ValueError(f"value_range {value_range!r}: give one of {VALUE_RANGES} or None")
    if isinstance(image, PIL.Image.Image):  # every mode as pil_modes says (it imports this one)
        from pipeline.espresso.pil_modes import one_rgb
        image = one_rgb(image)
    if torch.is_tensor(image):
        _check_tensor_layout(image)
        x = image.detach().cpu().permute(1, 2, 0)
    elif isinstance(image, np.ndarray):
        _check_array_layout(image)
        x = image
    else:
        raise ImageFormError(f"{type(image).__name__} is not an image: give a numpy array, an RGB "
                             "PIL image or a torch tensor")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ImageFormError(f"empty image ({x.shape[0]} x {x.shape[1]}): give a non-empty image")
    if x.dtype == np.uint8:
        return x
    if not torch.is_tensor(x) and x.dtype.kind != "f":
        raise ImageFormError(f"{x.dtype} image: convert to uint8 or float in [0, 1]")
    if not (torch.isfinite(x).all() if torch.is_tensor(x) else np.isfinite(x).all()):
        raise ImageFormError("non-finite values (NaN or inf): the image is corrupt; regenerate it")
    low, high = float(x.min()), float(x.max())
    if value_range is None:
        value_range = _tensor_range(low, high) if torch.is_tensor(x) else "0,1"
    if value_range == "-1,1":
        x = unit_range(x)
    elif low < 0 or high > 1:
        raise ImageFormError(f"float image with values outside [0, 1] (min {low:.3g}, max "
                             f"{high:.3g}): scale to [0, 1], or give uint8")
    return to_uint8(x.float().numpy() if torch.is_tensor(x)
                    else x.astype(np.promote_types(x.dtype, np.float32)))


def _check_array_layout(x: np.ndarray) -> None:
    if x.ndim == 2:
        raise ImageFormError("2-D image (H x W): give H x W x 3 RGB")
    if x.ndim != 3:
        raise ImageFormError(f"{x.ndim}-D array {x.shape}: give H x W x 3 RGB")
    if x.shape[-1] != 3 and x.shape[0] == 3:
        raise ImageFormError(f"channels-first array 3 x H x W {x.shape}: transpose to "
                             "H x W x 3 or pass a torch tensor")
    if x.shape[-1] == 4:
        raise ImageFormError("4 channels (RGBA?): drop alpha (image[..., :3]) / convert('RGB')")
    if x.shape[-1] != 3:
        raise ImageFormError(f"{x.shape[-1]} channels {x.shape}: give H x W x 3 RGB")


def _check_tensor_layout(t: torch.Tensor) -> None:
    if t.ndim == 3 and t.shape[0] != 3 and t.shape[-1] == 3:
        raise ImageFormError(f"channels-last tensor H x W x 3 {tuple(t.shape)}: permute(2, 0, 1)")
    if t.ndim != 3 or t.shape[0] != 3:
        raise ImageFormError(f"tensor of shape {tuple(t.shape)}: give 3 x H x W RGB")
    if not t.is_floating_point():
        raise ImageFormError(f"{t.dtype} tensor: give a float tensor and its value_range, or a "
                             "uint8 H x W x 3 numpy array")


def _tensor_range(low: float, high: float) -> str:
    """The value range of a float tensor whose caller did not state it, if unambiguous."""
    if -1 <= low < 0 and high <= 1:
        return "-1,1"
    if 0 <= low and high <= 1:
        raise ImageFormError("tensor in [0, 1] without value_range: ambiguous ([0, 1] or "
                             "[-1, 1]); pass value_range='0,1' or '-1,1'")
    raise ImageFormError(f"tensor with values outside [-1, 1] (min {low:.3g}, max {high:.3g}): "
                         "rescale to [0, 1] or [-1, 1] and pass value_range")


def black_image(image, value_range: str | None = None):
    """A black image in the form and shape of ``image`` (``None`` if it is no image): a black RGB
    PIL image of its size; for a float array or tensor in [-1, 1] (stated, or for a tensor
    inferred from negative values) -1 everywhere; else zeros."""
    if isinstance(image, PIL.Image.Image):
        return PIL.Image.new("RGB", image.size)
    if torch.is_tensor(image):
        signed = image.is_floating_point() and (
            value_range or ("-1,1" if bool((image < 0).any()) else "0,1")) == "-1,1"
        return torch.full_like(image, -1.0) if signed else torch.zeros_like(image)
    if isinstance(image, np.ndarray):
        signed = value_range == "-1,1" and image.dtype.kind == "f"
        return np.full_like(image, -1.0) if signed else np.zeros_like(image)
    return None


def as_image_list(images) -> list:
    """A batch (sequence of images, ``N x H x W x 3`` array, ``N x 3 x H x W`` tensor) as a list.
    A lone image raises ``ValueError``: an ``H x W x 3`` array could as well be H grey images."""
    if isinstance(images, PIL.Image.Image) or getattr(images, "ndim", 4) != 4:
        raise ValueError("give a batch: a list of images, an N x H x W x 3 array or an "
                         "N x 3 x H x W tensor (wrap a single image in a list)")
    return list(images)


def blocks(margin):
    """Espresso's decision, the one implementation (module docstring): True where the image is
    blocked, from anything with the sign of ``<phi_x(x), t_u - t_a>`` (the margin of raw or unit
    embeddings, or P(u|x) - 1/2). A NaN blocks: the filter fails closed."""
    return ~(margin <= 0)


def log_unscored(errors: list[str | None], what: str,
                 exc_info: BaseException | None = None) -> None:
    """One warning for a whole call: how many images were blocked unscored, and why."""
    reasons = Counter(e for e in errors if e is not None)
    if reasons:
        logger.warning("%s: blocked %d of %d images without a score: %s", what,
                       sum(reasons.values()), len(errors),
                       "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common()),
                       exc_info=exc_info)


_per_thread = threading.local()


def _last_results() -> weakref.WeakKeyDictionary:
    """The calling thread's last safety-checker result of each screen (weak: it goes with it)."""
    if not hasattr(_per_thread, "results"):
        _per_thread.results = weakref.WeakKeyDictionary()
    return _per_thread.results


#: A screen's last safety-checker result as seen by the calling thread (None before its first
#: call): threads sharing one screen (a web server's pipelines) never read each other's.
thread_last = property(lambda screen: _last_results().get(screen))


class ConceptScreen(nn.Module):
    """What every Espresso screen shares, for K concepts at once: the input forms, fail-closed
    scoring and the diffusers safety-checker call, written once. A subclass gives ``processor``,
    ``image_features`` (phi_x of pixel values), ``concept_p`` (P(u|x) per concept, ``N x K``) and
    ``cuts`` (K), and, for concepts with an everyday anchor t_n, ``everyday_p`` (P(u|x) against
    t_n, ``N x K``; 1 where a concept has none) and ``everyday_cuts`` (0 where none). Concept k
    fires where P(u|x) > cut k and P(u|x against t_n) > everyday cut k (:func:`blocks`, both);
    an image is blocked where any concept fires. :class:`EspressoFilter` is the one-concept case
    with the paper's cut 0.5; :class:`pipeline.espresso.checker.ConceptChecker` the many-concept
    one."""

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _keep_last(self, result) -> None:
        """Keep a safety-checker call's full result for the calling thread (``thread_last``)."""
        _last_results()[self] = result

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """logit P(u|x) per concept, ``N x K``: differentiable, finite where P saturates."""
        raise NotImplementedError

    def concept_p(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.concept_logits(features))

    @property
    def cuts(self) -> np.ndarray:
        raise NotImplementedError

    def everyday_logits(self, features: torch.Tensor) -> torch.Tensor:
        """logit P(u|x) against each concept's everyday anchor, ``N x K`` (+inf: no anchor)."""
        return features.new_full((len(features), len(self.cuts)), float("inf"))

    def everyday_p(self, features: torch.Tensor) -> torch.Tensor:
        """P(u|x) against each concept's everyday anchor, ``N x K`` (1: no anchor, no gate)."""
        return torch.sigmoid(self.everyday_logits(features))

    def decision_margin(self, features: torch.Tensor) -> torch.Tensor:
        """float64 N, > 0 exactly where the image is blocked (a concept's P(u|x) and gate both
        above their cuts), in logits: what a pixel-space attack pushes on."""
        cuts = torch.logit(torch.as_tensor(self.cuts, dtype=torch.float64))
        gates = torch.logit(torch.as_tensor(self.everyday_cuts, dtype=torch.float64))
        fired = torch.minimum(self.concept_logits(features).double() - cuts.to(features.device),
                              self.everyday_logits(features).double() - gates.to(features.device))
        return fired.amax(-1)

    @property
    def everyday_cuts(self) -> np.ndarray:
        """The gate's cut per concept (0 where a concept has no everyday anchor)."""
        return np.zeros(len(self.cuts))

    def pixel_values(self, images, value_range: str | None = None) -> torch.Tensor:
        """The processor's pixel values of a batch in any accepted form, via the canonical uint8
        form; an invalid image raises ``ValueError`` naming it, the problem and the fix."""
        canonical = []
        for i, image in enumerate(as_image_list(images)):
            try:
                canonical.append(canonical_image(image, value_range))
            except ImageFormError as err:
                raise ImageFormError(f"image {i}: {err}") from None
        return clip_pixels(self.processor, canonical)

    @torch.no_grad()
    def embed(self, images, value_range: str | None = None, batch: int = 256) -> torch.Tensor:
        """Un-normalised phi_x of a batch in any accepted form, in batches; an invalid image
        raises ``ValueError`` (this is not a decision, so nothing is blocked)."""
        images = as_image_list(images)
        return torch.cat([self.image_features(self.pixel_values(images[i:i + batch], value_range))
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def _screen(self, images, value_range: str | None, batch: int, what: str):
        """(images with blocked ones black, P(u|x) ``N x K``, P(u|x) against the everyday anchor
        ``N x K``, fired ``N x K``, errors) of a batch in any accepted form. Fails closed: an
        image of invalid or ambiguous form, or on which the model raises (a failed chunk is scored
        again image by image, so only the images that fail alone are blocked), is unscored (NaN),
        fires every concept, and has its reason in ``errors``; one warning per call sums these
        up; each image is judged on its own."""
        images = as_image_list(images)
        scores = np.full((2, len(images), len(self.cuts)), np.nan)
        errors: list[str | None] = [None] * len(images)
        canonical = {}
        for i, image in enumerate(images):
            try:
                canonical[i] = canonical_image(image, value_range)
            except ImageFormError as err:
                errors[i] = str(err)
        rows, failure = list(canonical), None
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixel_values = partial(self.pixel_values, [canonical[i] for i in chunk])
            chunk_failure = self._score_rows(scores, errors, chunk, pixel_values)
            if chunk_failure is not None and len(chunk) > 1:  # one bad image blocks only itself
                chunk_failure = None
                for i in chunk:
                    errors[i] = None
                    chunk_failure = self._score_rows(scores, errors, [i], partial(
                        self.pixel_values, [canonical[i]])) or chunk_failure
            failure = chunk_failure or failure
        fired = self._decide(scores, errors, what, failure)
        blocked = fired.any(1)
        out = [black_image(im, value_range) if b else im for im, b in zip(images, blocked)]
        return out, scores[0], scores[1], fired, errors

    def _score_rows(self, scores: np.ndarray, errors: list[str | None], rows: list[int],
                    pixel_values) -> Exception | None:
        """``scores[:, rows]`` = P(u|x) and P(u|x) against the everyday anchor of
        ``pixel_values()``. Fails closed: if that raises, the rows get the exception as their
        reason, and it is returned for the call's one log line."""
        try:
            features = self.image_features(pixel_values())
            scores[0, rows] = self.concept_p(features).cpu().numpy()
            scores[1, rows] = self.everyday_p(features).cpu().numpy()
        except Exception as err:  # noqa: BLE001 - not hidden: recorded per image and logged
            for i in rows:
                errors[i] = f"scoring failed: {type(err).__name__}: {err}"
            scores[:, rows] = np.nan
            return err
        return None

    def _decide(self, scores: np.ndarray, errors: list[str | None], what: str,
                failure: BaseException | None) -> np.ndarray:
        """Fired (``N x K``) = P(u|x) > cut and P(u|x against t_n) > everyday cut, or no finite
        score (both scores of such an image become NaN, and its reason goes to ``errors``);
        logs."""
        unscored = np.isnan(scores).any((0, 2))
        scores[:, unscored] = np.nan
        for i in np.flatnonzero(unscored):
            errors[i] = errors[i] or "the model gave a non-finite score"
        log_unscored(errors, what, failure)
        return (blocks(scores[0] - self.cuts) & blocks(scores[1] - self.everyday_cuts)
                | unscored[:, None])

    @torch.no_grad()
    def _safety_check(self, images, clip_input: torch.Tensor):
        """diffusers' safety-checker call (see ``forward`` of the subclasses): (images with
        blocked ones zeroed, P(u|x) ``N x K``, P(u|x) against the everyday anchor ``N x K``,
        fired ``N x K``, errors). Fails closed like :meth:`_screen`: a ``clip_input`` row that
        is not 3-channel and finite is blocked with its reason."""
        scores, failure = np.full((2, len(images), len(self.cuts)), np.nan), None
        if (torch.is_tensor(clip_input) and clip_input.ndim == 4 and clip_input.shape[1] == 3
                and len(clip_input) == len(images)):
            errors: list[str | None] = [None] * len(images)
            # every row is scored in one call (rows are independent: a corrupt row's NaN stays
            # in it and blocks it); only rows without a finite score have their input examined
            failure = self._score_rows(scores, errors, list(range(len(images))),
                                       lambda: clip_input)
            unscored = np.flatnonzero(np.isnan(scores).any((0, 2)))
            if failure is None and len(unscored):
                finite = torch.isfinite(clip_input[unscored.tolist()]).flatten(1).all(1)
                for i in unscored[~finite.cpu().numpy()]:
                    errors[i] = "clip_input row with non-finite values: the image is corrupt"
        else:
            shape = tuple(getattr(clip_input, "shape", ()))
            errors = [f"clip_input of shape {shape} for {len(images)} images: give the feature "
                      "extractor's pixel values, N x 3 x H x W"] * len(images)
        fired = self._decide(scores, errors, "safety checker", failure)
        blocked = fired.any(1)
        if blocked.any():
            images = images.clone() if torch.is_tensor(images) else np.array(images)
            images[np.flatnonzero(blocked).tolist()] = 0
        return images, scores[0], scores[1], fired, errors


def _is_texts(value) -> bool:
    """A non-empty list (or tuple) of non-blank strings: what everyday and in-context texts are
    (a string, a mapping or numbers would be split or tokenized into something else)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(t, str) and t.strip() for t in value))


class EspressoFilter(ConceptScreen):
    """CLIP concept filter for one concept pair (``unacceptable``, ``acceptable``).

    ``templates`` (e.g. ``["a photo of {}"]``) turns each concept into a prompt ensemble whose
    normalised embeddings are averaged; the paper encodes the raw concept text (``["{}"]``).

    ``everyday`` (texts of what the platform serves that name neither concept, e.g. its
    ordinary prompts) adds the everyday anchors t_n, one unit embedding per text: then the image
    is blocked only where t_u also beats the nearest of them, P(u|x against t_n) =
    sigmoid(s (<e, t_u> - max_j <e, t_n,j>)) > ``everyday_cut`` (0.5: u beats a and every
    everyday text; calibrated by :meth:`ConceptChecker.calibrate_everyday`). Without them an
    image of neither concept is judged by which of two unrelated texts it is nearer (docs/
    method.md, "Images of neither concept"). None: the paper's filter.

    ``in_context`` (with ``everyday``: everyday texts with c_u put into them, e.g. "a checkered
    arrow on a brown background" beside the anchor "a dotted arrow on a brown background";
    :func:`pipeline.concepts.everyday_draw` makes them) adds t_c: the gate then compares whole
    captions on both sides, sigmoid(s (max(<e, t_u>, max_j <e, t_c,j>) - max_j <e, t_n,j>)).
    Without them an image of c_u in an everyday scene meets its scene's caption among the anchors
    but only the bare concept text on its own side, and the gate stops it.
    """

    def __init__(self, clip, tokenizer, processor, unacceptable: str, acceptable: str,
                 templates: list[str] | None = None, *, everyday: list[str] | None = None,
                 everyday_cut: float = 0.5, in_context: list[str] | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.processor = clip, tokenizer, processor
        self.unacceptable, self.acceptable = unacceptable, acceptable
        self.templates = list(templates or ["{}"])
        if everyday is not None and not _is_texts(everyday):
            raise ValueError("everyday: give a non-empty list of texts (or None for the paper's "
                             "filter)")
        if not (isinstance(everyday_cut, (int, float)) and 0 < everyday_cut < 1):
            raise ValueError(f"everyday_cut {everyday_cut!r}: give a number in (0, 1)")
        if in_context is not None and (everyday is None or not _is_texts(in_context)):
            raise ValueError("in_context: give a non-empty list of texts, with everyday texts "
                             "(they are the everyday texts with the concept put in)")
        self.everyday = None if everyday is None else list(everyday)
        self.everyday_cut = float(everyday_cut)
        self.in_context = None if in_context is None else list(in_context)
        self.refresh_concepts()

    # ---- concept embeddings (computed once, not per image) ------------------------------
    def concept_embedding(self, concept: str) -> torch.Tensor:
        prompts = [t.format(concept) for t in self.templates]
        return F.normalize(text_embeddings(self.clip, self.tokenizer, prompts).mean(0), dim=-1)

    def refresh_concepts(self) -> None:
        """Recompute t_u and t_a (call after changing the text encoder's weights). Refuses a
        direction t_u - t_a that is zero or not finite: the filter would pass every image (or
        decide nothing), so there is no such filter to hand out."""
        t_u, t_a = self.concept_embedding(self.unacceptable), self.concept_embedding(self.acceptable)
        concepts = f"unacceptable {self.unacceptable!r} / acceptable {self.acceptable!r}"
        source = getattr(self.clip.config, "_name_or_path", "") or "the given CLIP"
        if not (torch.isfinite(t_u).all() and torch.isfinite(t_a).all()):
            raise ValueError(f"the concept embeddings of {concepts} are not finite (NaN or inf): "
                             f"the CLIP weights of {source} are damaged; restore or re-save them")
        norm = (t_u - t_a).norm().item()
        if norm < MIN_DIRECTION_NORM:
            raise ValueError(f"the concept texts {concepts} give the same embedding in "
                             f"{source} (|t_u - t_a| = {norm:.2g} < {MIN_DIRECTION_NORM:g}): the "
                             "filter's direction is zero and every image would pass; give two "
                             "concept texts that differ in meaning (data/concepts.yaml)")
        self.register_buffer("t_u", t_u, persistent=False)
        self.register_buffer("t_a", t_a, persistent=False)
        self.register_buffer("t_n", None if self.everyday is None else self._everyday_anchor(),
                             persistent=False)
        self.register_buffer("t_c", None if self.in_context is None else self._in_context_anchor(),
                             persistent=False)

    def _everyday_anchor(self) -> torch.Tensor:
        """t_n: the everyday texts' unit embeddings, ``M x d`` (raw texts: they are whole
        prompts); refused where one is not finite or equals t_u."""
        t_n = F.normalize(text_embeddings(self.clip, self.tokenizer, self.everyday), dim=-1)
        if (not torch.isfinite(t_n).all()
                or ((self.t_u - t_n).norm(dim=-1) < MIN_DIRECTION_NORM).any()):
            raise ValueError(f"an everyday text gives an anchor that is not finite or equals the "
                             f"unacceptable concept {self.unacceptable!r}: give texts of what the "
                             "platform serves that do not name it")
        return t_n

    def _in_context_anchor(self) -> torch.Tensor:
        """t_c: the in-context texts' unit embeddings, ``M' x d``; refused where one is not
        finite or equals an everyday anchor (a text on both sides of the gate)."""
        t_c = F.normalize(text_embeddings(self.clip, self.tokenizer, self.in_context), dim=-1)
        if not torch.isfinite(t_c).all() or (torch.cdist(t_c, self.t_n) < MIN_DIRECTION_NORM).any():
            raise ValueError("an in-context text gives an embedding that is not finite or equals "
                             "an everyday text's: give the everyday texts with the concept put in")
        return t_c

    @property
    def direction(self) -> torch.Tensor:
        """w = t_u - t_a: the decision is the sign of <phi_x(x), w>."""
        return self.t_u - self.t_a

    def margin(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``<embeddings, t_u - t_a>`` per row: its sign is the decision (:func:`blocks`)."""
        return embeddings @ self.direction

    @property
    def device(self) -> torch.device:
        """diffusers pipelines ask every component for its device and dtype."""
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    @property
    def logit_scale(self) -> float:
        return self.clip.logit_scale.detach().exp().item()

    # ---- scores ---------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Un-normalised projected image embeddings phi_x(x)."""
        return image_features(self.clip, pixel_values, normalize=False)

    def p_unacceptable(self, features: torch.Tensor) -> torch.Tensor:
        """P(u|x), cosine/softmax form (the paper's)."""
        e = F.normalize(features, dim=-1)
        return torch.sigmoid(self.logit_scale * self.margin(e))

    def p_unacceptable_projection(self, features: torch.Tensor) -> torch.Tensor:
        """P(u|x), projection form (first arXiv version): project e onto d = w/|w| and softmax
        the negative distances of the projection to t_u and t_a. Same decision, other score."""
        e = F.normalize(features, dim=-1)
        d = F.normalize(self.direction, dim=-1)
        projection = (e @ d)[:, None] * d
        distances = torch.stack([(projection - self.t_u).norm(dim=-1),
                                 (projection - self.t_a).norm(dim=-1)], dim=-1)
        return torch.softmax(-self.logit_scale * distances, dim=-1)[:, 0]

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.margin(F.normalize(features, dim=-1))[:, None]

    @property
    def cuts(self) -> np.ndarray:
        """The paper's decision, P(u|x) > 0.5."""
        return np.array([0.5])

    def everyday_logits(self, features: torch.Tensor) -> torch.Tensor:
        """logit P(u|x) against the nearest everyday anchor, s (<e, t_u> - max_j <e, t_n,j>),
        with t_u the nearest of t_u and the in-context texts t_c where there are any (+inf
        without anchors); float64, as the checker's."""
        if self.t_n is None:
            return super().everyday_logits(features)
        e = F.normalize(features, dim=-1)
        unacceptable = e @ self.t_u
        if self.t_c is not None:
            unacceptable = torch.maximum(unacceptable, (e @ self.t_c.T).max(-1).values)
        margin = unacceptable - (e @ self.t_n.T).max(-1).values
        return (self.logit_scale * margin.double())[:, None]

    @property
    def everyday_cuts(self) -> np.ndarray:
        return np.array([self.everyday_cut if self.t_n is not None else 0.0])

    def _screening(self, images, p, gate, fired, errors) -> Screening:
        return Screening(images, fired[:, 0], p[:, 0], errors, self.unacceptable,
                         None if self.t_n is None else gate[:, 0])

    # ---- screening ------------------------------------------------------------------------
    def screen(self, images, value_range: str | None = None, batch: int = 64) -> Screening:
        """Score a batch of images in any accepted form (module docstring; ``value_range``:
        ``"0,1"`` or ``"-1,1"``, the range of float images, needed for tensors in [0, 1]) and
        block those with P(u|x) > 0.5. Fails closed: an image of invalid or ambiguous form, or in
        a chunk on which the model raises, is blocked unscored with its reason in ``errors``, and
        one warning per call sums these up; each image is judged on its own.

        ``images`` of the result: the inputs, each blocked one replaced by
        :func:`black_image` (same form and shape; a PIL image becomes black RGB)."""
        return self._screening(*self._screen(images, value_range, batch, "screen"))

    def forward(self, images, clip_input: torch.Tensor):
        """diffusers' safety-checker call: ``images`` (a tensor in [-1, 1] or an array in [0, 1],
        batch first) and ``clip_input``, the feature extractor's pixel values of the same images.
        Returns the images with blocked ones zeroed (diffusers leaves flagged images
        un-denormalised, so zero is black) and the per-image flags; the full result, scores and
        reasons, is kept as ``self.last_screening`` (per thread). Fails closed like :meth:`screen`."""
        screening = self._screening(*self._safety_check(images, clip_input))
        self._keep_last(screening)
        return screening.images, screening.blocked.tolist()

    #: The :class:`Screening` of the calling thread's last safety-checker call (None before one).
    last_screening = thread_last

    # ---- persistence ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """The whole CLIP (loads as a plain ``CLIPModel``), tokenizer, processor, and the concept
        pair in ``espresso.json``; written atomically."""
        with atomic_dir(folder) as tmp:
            for part in (self.clip, self.tokenizer, self.processor):
                part.save_pretrained(tmp)
            everyday = ({} if self.everyday is None else
                        {"everyday": self.everyday, "everyday_cut": self.everyday_cut})
            if self.in_context is not None:
                everyday["in_context"] = self.in_context
            (tmp / CONFIG_FILE).write_text(json.dumps(
                {"unacceptable": self.unacceptable, "acceptable": self.acceptable,
                 "templates": self.templates, **everyday}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None) -> "EspressoFilter":
        folder = resolve_source(folder, "filter folder")  # missing: one line, at once
        config_path = Path(folder) / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved Espresso filter (no {CONFIG_FILE}); "
                                    "for a plain CLIP use EspressoFilter.from_clip(...)")
        config = json.loads(config_path.read_text())
        return cls.from_clip(str(folder), config["unacceptable"], config["acceptable"],
                             config["templates"], device, dtype, everyday=config.get("everyday"),
                             everyday_cut=config.get("everyday_cut", 0.5),
                             in_context=config.get("in_context"))

    @classmethod
    def from_clip(cls, source: str, unacceptable: str, acceptable: str,
                  templates: list[str] | None = None, device=None, dtype=None, *,
                  everyday: list[str] | None = None, everyday_cut: float = 0.5,
                  in_context: list[str] | None = None) -> "EspressoFilter":
        """A zero-shot filter on any CLIP (local folder or hub id)."""
        clip, tokenizer, processor = load_clip(source, device, dtype)
        return cls(clip, tokenizer, processor, unacceptable, acceptable, templates,
                   everyday=everyday, everyday_cut=everyday_cut, in_context=in_context)
