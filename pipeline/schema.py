"""What ``params.yaml`` and ``data/concepts.yaml`` may hold: every key with its type, range and
allowed values (pydantic models; extra keys are refused, so a typo'd key is caught), and the
reading of both files into one line per problem (key path, value, what is allowed).

Its own module, not inside ``params.py`` or ``concepts.py``: the rules of both files (and the
checks that cross them, such as ``concept`` naming a registry entry) are read in one place, and
``params.py`` / ``concepts.py`` stay about loading and using the values. It imports pydantic, yaml,
the mini world's vocabulary, ``pipeline.registry`` and (to check a scheduler name)
``pipeline.espresso.models``, which every stage runs anyway: a stage's code deps grow by this
file and the registry.

Names that code elsewhere keys tables by (attacks, CRTs, filters, optimisers, separations,
vocabularies) come from ``pipeline.registry``, whose names the tables are checked against where
they are built: the schema allows exactly what the code implements, without importing that code.

The stages get the validated model (``pipeline.params.load_params``), not the dict: typed
sections (``params.generate.seed``), and where code picks a sub-section by a name it holds, a
small accessor (``params.attack.of(setting).of("cce")``). Where a dict is needed (a hash, a
file, a library call), ``model_dump()`` gives it: its keys in the order declared here (inherited
fields first: not always params.yaml's order, so what is hashed sorts its keys);
``model_dump(exclude_unset=True)`` gives back the dict validated (floats where it had integers).
"""
import re
import string
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen, MultipleOf
from pydantic import (AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo,
                      create_model, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from pipeline import registry
from pipeline.mini import shapes


class ParamsError(ValueError):
    """A value of params.yaml or data/concepts.yaml that is missing or not allowed; the message
    has one line per problem, each naming the key, the value and what is allowed."""


class Allowed:
    """Annotation metadata: how to say what a field allows, where its type does not say it."""

    def __init__(self, text: str):
        self.text = text


def not_allowed(allowed: str, at: tuple = ()) -> PydanticCustomError:
    """A validator's refusal: ``allowed`` says what would be; ``at`` is the key path below the
    validated field or model where the problem is (a model validator's loc is the model)."""
    return PydanticCustomError("not_allowed", "{allowed}", {"allowed": allowed, "at": at})


def unknown_key(allowed: str, at: tuple) -> PydanticCustomError:
    """A validator's refusal of a key (not of its value): ``allowed`` says which keys would do."""
    return PydanticCustomError("unknown_key", "{allowed}", {"allowed": allowed, "at": at})


class Strict(BaseModel):
    """No coercion (``"5"`` is not 5), no unknown keys, no infinite or NaN number (``.inf``
    guidance draws black images, an infinite lr trains NaN weights)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def field_named(model: BaseModel, name: str, what: str, names: tuple[str, ...] = ()) -> Any:
    """The field ``name`` of ``model``, for code that holds the name (a setting, an attack, a
    CRT); a ``KeyError`` naming ``what`` and the known names if it is not one of ``names`` (by
    default: the model's fields)."""
    names = names or tuple(type(model).model_fields)
    if name not in names:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(names)}")
    return getattr(model, name)


class PerSetting(Strict):
    """A section with one sub-section per setting (``mini``, ``paper``)."""

    def of(self, setting: str):
        """The sub-section of ``setting``."""
        return field_named(self, setting, "setting")


#: Bounds that keep memory and numerics sane. Seeds: numpy's and torch's generators take
#: 0..2**32-1. Counts (steps, prompts, batches...): a million is beyond every budget, and keeps
#: products of counts far below int64. Learning rates above 1 and guidance above 100 only make
#: NaN or saturated images; images are what a stage holds in memory, planned in ``Params``.
MAX_SEED = 2**32 - 1
MAX_COUNT = 10**6
MAX_GUIDANCE = 100.0
MAX_IMAGE_BYTES = 8 * 2**30
Seed = Annotated[int, Ge(0), Le(MAX_SEED)]
Count = Annotated[int, Ge(1), Le(MAX_COUNT)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
LearningRate = Annotated[float, Gt(0), Le(1)]
Guidance = Annotated[float, Ge(0), Le(MAX_GUIDANCE)]
#: SD pipelines need a multiple of 8 (the VAE and UNet halve it); 1024 is beyond both models.
ImageSize = Annotated[int, Ge(8), Le(1024), MultipleOf(8),
                      Allowed("a multiple of 8 from 8 to 1024 (what the VAE and UNet can halve)")]
Fraction = Annotated[float, Ge(0), Le(1)]
Text = Annotated[str, MinLen(1), Allowed("a non-empty text")]


# ---- data/concepts.yaml -------------------------------------------------------------------
Kind = Literal["opposite", "broader_class", "style"]
KINDS: tuple[str, ...] = get_args(Kind)
#: The I2P benchmark's categories (its ``categories`` column), from which paper opposites take
#: their test prompts.
I2PCategory = Literal["hate", "harassment", "violence", "self-harm", "sexual", "shocking",
                      "illegal activity"]
#: The slots a mini template may use: the world's vocabulary (the character aside: that is what
#: concepts name) and its background wordings.
MINI_SLOTS = {**{k: list(v) for k, v in shapes.VOCAB.items() if k != "character"},
              "wording": list(shapes.BACKGROUND_WORDINGS)}


def _concept_text(text: str) -> str:
    if not text.strip():
        raise not_allowed("a concept text that is not blank")
    if set(text) & set("{}") or not text.isprintable():
        raise not_allowed("a concept text without { or } (they mark the templates' slots) and "
                          "without control characters such as line breaks")
    return text


ConceptText = Annotated[str, AfterValidator(_concept_text), Allowed("a non-blank text")]


def _concept_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
        raise not_allowed("a concept name of lowercase letters, digits and _, starting with a "
                          "letter (names become folder and file names)")
    return name


ConceptName = Annotated[str, AfterValidator(_concept_name)]


class Concept(Strict):
    unacceptable: ConceptText
    acceptable: ConceptText
    kind: Kind

    @model_validator(mode="after")
    def _texts_differ(self):
        """c_u = c_a makes the filter's direction t_u - t_a zero: every image would pass."""
        if self.unacceptable.strip().casefold() == self.acceptable.strip().casefold():
            raise not_allowed(f"a text other than the unacceptable one ({self.unacceptable!r}): "
                              "with c_u = c_a the filter's direction is zero and every image "
                              "passes", at=("acceptable",))
        return self


def _shows(shows: dict[str, str]) -> dict[str, str]:
    """The judge's one verdict ``{head: value}`` that means c_u (``shapes.VOCAB``)."""
    if len(shows) != 1:
        raise not_allowed(f"exactly one head: value of the judge (heads: {', '.join(shapes.VOCAB)})")
    ((head, value),) = shows.items()
    if head not in shapes.VOCAB:
        raise not_allowed(f"a judge head: {', '.join(shapes.VOCAB)}")
    if value not in shapes.VOCAB[head]:
        raise not_allowed(f"a value of the judge's {head} head: "
                          f"{', '.join(shapes.VOCAB[head])}", at=(head,))
    return shows


class MiniConcept(Concept):
    shows: Annotated[dict[str, str], AfterValidator(_shows),
                     Allowed(f"one judge head: value, e.g. {{character: zorbo}} "
                             f"(heads: {', '.join(shapes.VOCAB)})")]


class PaperConcept(Concept):
    i2p_category: Optional[I2PCategory] = None


Templates = create_model("Templates", __base__=Strict,
                         **{kind: (Annotated[list[Text], MinLen(1)], ...) for kind in KINDS})


ConceptsBySetting = create_model("ConceptsBySetting", __base__=Strict,
                                 mini=(dict[ConceptName, MiniConcept], ...),
                                 paper=(dict[ConceptName, PaperConcept], ...))
TemplatesBySetting = create_model("TemplatesBySetting", __base__=Strict, mini=(Templates, ...),
                                  paper=(Templates, ...))
Slots = create_model("Slots", __base__=Strict,
                     paper=(dict[str, Annotated[list[Text], MinLen(1)]], ...))


class EverydayTemplates(Strict):
    """Prompts of neither c_u nor c_a (the everyday test condition). Mini: the world's own
    captions (``pipeline.concepts.everyday_prompts``), so only the paper setting has templates."""

    paper: Annotated[list[Text], MinLen(1)]


class Registry(Strict):
    concepts: ConceptsBySetting
    templates: TemplatesBySetting
    slots: Slots
    everyday: EverydayTemplates

    @model_validator(mode="after")
    def _templates_fill(self):
        """Each template holds the concept ``{}`` and only slots its setting fills."""
        slots = {"mini": MINI_SLOTS, "paper": self.slots.paper}
        for setting in ("mini", "paper"):
            for kind in KINDS:
                for i, template in enumerate(getattr(getattr(self.templates, setting), kind)):
                    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
                    if "" not in names or names - {""} - set(slots[setting]):
                        raise not_allowed(
                            f"a template with the concept as {{}} and slots among: "
                            f"{', '.join(slots[setting])}", at=("templates", setting, kind, i))
        for i, template in enumerate(self.everyday.paper):
            names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            if "" in names or names - set(self.slots.paper):
                raise not_allowed(f"a template without the concept {{}} (everyday prompts name "
                                  f"none) and slots among: {', '.join(self.slots.paper)}",
                                  at=("everyday", "paper", i))
        return self


# ---- params.yaml --------------------------------------------------------------------------
def _scheduler(name: str) -> str:
    from pipeline.espresso.t2i import sampling_schedulers

    if name not in sampling_schedulers():
        raise not_allowed(f"{SCHEDULERS}: {', '.join(sampling_schedulers())}")
    return name


SCHEDULERS = "a diffusers scheduler that samples these models correctly"
Scheduler = Annotated[str, AfterValidator(_scheduler), Allowed(SCHEDULERS)]


class Models(Strict):
    """A local folder or a hub id per model."""

    clip: Text
    t2i: Text
    judge: Text
    eyes: Text


SPLIT_NAMES = ("train", "val", "test")


class Splits(Strict):
    train: Count
    val: Count
    test: Count


class Sampler(Strict):
    scheduler: Scheduler
    steps: Count
    guidance: Guidance
    size: ImageSize
    batch: Count


class Generate(PerSetting):
    seed: Seed
    prompts: Splits
    images_per_prompt: Splits
    shard_size: Count
    mini: Sampler
    paper: Sampler

    def of(self, setting: str) -> Sampler:
        return super().of(setting)


class Weights(Strict):
    unacceptable: NonNegative
    acceptable: NonNegative
    separation: NonNegative


class ByKind(Strict):
    def of(self, kind: str) -> Weights:
        """The weights of the concept kind ``kind``."""
        return field_named(self, kind, "concept kind")


KindWeights = create_model("KindWeights", __base__=ByKind, **{k: (Weights, ...) for k in KINDS})


class FinetuneSetting(Strict):
    separation: Literal[registry.SEPARATIONS]
    optimizer: Literal[registry.OPTIMIZERS]
    epochs: Count
    epochs_by_concept: dict[str, Count] = {}

    def epochs_of(self, concept: str) -> int:
        """The epochs of ``concept``: its own in ``epochs_by_concept``, else ``epochs``."""
        return self.epochs_by_concept.get(concept, self.epochs)


class Finetune(PerSetting):
    seed: Seed
    batch: Count
    lr: LearningRate
    betas: Annotated[list[Annotated[float, Ge(0), Lt(1)]], MinLen(2), MaxLen(2),
                     Allowed("two numbers in [0, 1), e.g. [0.9, 0.98]")]
    eps: Positive
    weight_decay: NonNegative
    weights: KindWeights
    mini: FinetuneSetting
    paper: FinetuneSetting

    def of(self, setting: str) -> FinetuneSetting:
        return super().of(setting)

    @model_validator(mode="before")
    @classmethod
    def _per_setting_keys_below(cls, data: Any) -> Any:
        """A per-setting key at the top would be ignored: say where it goes."""
        for key in set(FinetuneSetting.model_fields) & set(data if isinstance(data, dict) else ()):
            raise not_allowed(f"under finetune.mini and finetune.paper ({key} is per setting)",
                              at=(key,))
        return data

    @model_validator(mode="after")
    def _epochs_of_known_concepts(self, info: ValidationInfo):
        """A mistyped concept in ``epochs_by_concept`` would silently train the default epochs."""
        registry = (info.context or {}).get("registry")
        for setting in ("mini", "paper") if registry else ():
            known = registry["concepts"][setting]
            for name in getattr(self, setting).epochs_by_concept:
                if name not in known:
                    raise not_allowed(f"a {setting} concept: {', '.join(sorted(known))}",
                                      at=(setting, "epochs_by_concept", name))
        return self


# The attack section. Adding a key to every attack's budgets, or an attack, is a one-line edit.
#: An adaptive term's strengths, in units of the target's own margin spread (scale-free: the
#: attacker measures the spread on its training data; ``pipeline.attacks.objective``).
Strengths = Annotated[list[NonNegative], MinLen(1)]


def _budget_fractions(fractions: list[float]) -> list[float]:
    if not fractions or fractions != sorted(set(fractions)) or fractions[-1] != 1.0 \
            or fractions[0] <= 0:
        raise not_allowed("increasing fractions in (0, 1] ending at 1.0 (the full budget), "
                          "e.g. [0.25, 0.5, 1.0]; [1.0] for no curve")
    return fractions


#: Fractions of every attack's search budget (steps, generations) at which its result is also
#: evaluated: the budget curve (``pipeline.attacks.context.AttackContext.budgets``).
BudgetFractions = Annotated[list[float], AfterValidator(_budget_fractions)]


class Search(Strict):
    """What every search-based attack (PEZ, Typo, RingBell, UnlearnDiff) is given."""

    tokens: Count
    candidates: Count       # independent runs, of which the trial keeps `attack.prompts`
    selection_images: Count


class Typo(Search):
    steps: Count
    lr: Positive
    weight_decay: NonNegative
    text_height: Annotated[float, Gt(0), Le(1)]
    adaptive_weights: Strengths


class Pez(Search):
    steps: Count
    lr: Positive
    weight_decay: NonNegative
    adaptive_weights: Strengths


class Cce(Strict):
    steps: Count
    batch: Count
    lr: Positive
    adaptive_weights: Strengths
    selection_images: Count


class RingBell(Search):
    eta: Positive
    population: Annotated[int, Ge(2)]
    generations: Count
    elite: Annotated[float, Gt(0), Le(1)]
    crossover: Fraction
    mutation: Fraction
    operators: Literal[registry.RINGBELL_OPERATORS]
    adaptive_weights: Strengths


class UnlearnDiff(Search):
    """UnlearnDiffAtk (Zhang et al. 2024): ``tokens`` hard prefix tokens optimised through an
    edited model's denoising loss; ``batch`` target images per step."""

    steps: Count
    batch: Count
    lr: Positive
    weight_decay: NonNegative


class Budgets(Strict):
    """One setting's budgets: a field per attack of ``pipeline.registry.ATTACKS``."""

    vocabulary: Literal[registry.VOCABULARIES]
    typo: Typo
    pez: Pez
    cce: Cce
    ringbell: RingBell
    udiff: UnlearnDiff

    def of(self, attack: str) -> Union[Typo, Pez, Cce, RingBell, UnlearnDiff]:
        """The budget of the attack ``attack``."""
        return field_named(self, attack, "attack", registry.ATTACKS)


ATTACK_NAMES = tuple(registry.implemented(
    registry.ATTACKS, {k: v for k, v in Budgets.model_fields.items() if k != "vocabulary"},
    "pipeline.schema.Budgets"))
#: The filters an adaptive attack may adapt to (``pipeline.registry.ADAPTABLE``: those with a
#: margin on CLIP embeddings, ``FilterBank.by_name``).
Filter = Literal[registry.ADAPTABLE]


def _names_among(known: tuple[str, ...]):
    def check(names: list[str]) -> list[str]:
        if set(names) - set(known) or len(set(names)) != len(names) or not names:
            raise not_allowed(f"a list of {', '.join(known)}, each at most once")
        return names
    return check


def _distinct_filters(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise not_allowed(f"a list of distinct filters among {', '.join(get_args(Filter))} "
                          "(or [])")
    return names


class Attack(PerSetting):
    """``attacks`` run plain (scored by every CRT: the edits render its prompts) and "+" once per
    filter of ``adapt_to``; ``edit_attacks`` run adapted to each model of ``edit.crts``, through
    its UNet (METHOD section 6). Every run is repeated for ``seeds`` attack seeds, and evaluated at
each fraction of ``budgets`` of its search (one search: snapshots of it). A new key of
    every attack's budgets is one line in its class above."""

    seed: Seed
    seeds: Count
    budgets: BudgetFractions
    attacks: Annotated[list[str], AfterValidator(_names_among(registry.FILTER_ATTACKS))]
    edit_attacks: Annotated[list[str], AfterValidator(_names_among(registry.EDIT_ATTACKS))]
    adapt_to: Annotated[list[Filter], AfterValidator(_distinct_filters)]
    targets: Count
    prompts: Count
    images_per_prompt: Count
    curve_images_per_prompt: Count
    mini: Budgets
    paper: Budgets

    def of(self, setting: str) -> Budgets:
        return super().of(setting)

    @model_validator(mode="after")
    def _curve_within_the_images(self):
        if self.curve_images_per_prompt > self.images_per_prompt:
            raise not_allowed(f"an integer <= attack.images_per_prompt ({self.images_per_prompt}):"
                              " the curve scores the first images of each prompt",
                              at=("curve_images_per_prompt",))
        return self

    @model_validator(mode="after")
    def _enough_candidates(self):
        for setting in ("mini", "paper"):
            for name in ATTACK_NAMES:
                budget = getattr(getattr(self, setting), name)
                if getattr(budget, "candidates", self.prompts) < self.prompts:
                    raise not_allowed(f"an integer >= attack.prompts ({self.prompts}): the trial "
                                      "keeps that many of the candidates",
                                      at=(setting, name, "candidates"))
        return self


class Probe(Strict):
    regularization: Positive   # scikit-learn's C: inverse L2 strength
    max_iter: Count


class Filters(Strict):
    """The filtering CRTs' own settings (the safety checker's cut is calibrated, not set)."""

    mhsc: Probe


# The edit section: the fine-tuning CRTs of ``pipeline.registry.CRTS``.
class Esd(Strict):
    steps: Count
    lr: LearningRate
    eta: Positive              # negative guidance
    sample_guidance: Guidance
    batch: Count
    checkpoint_every: Count


class Uce(Strict):
    regularization: Positive   # lambda: weight of keeping the old projection
    preserve_scale: NonNegative


class Ca(Strict):
    steps: Count
    lr: LearningRate
    batch: Count
    anchor_weight: NonNegative
    checkpoint_every: Count


class EditBudgets(Strict):
    esd_x: Esd
    esd_u: Esd
    uce: Uce
    ca: Ca

    def of(self, crt: str) -> Union[Esd, Uce, Ca]:
        """The budget of the CRT ``crt``."""
        return field_named(self, crt, "CRT")


EDIT_NAMES = tuple(registry.implemented(registry.CRTS, EditBudgets.model_fields,
                                        "pipeline.schema.EditBudgets"))


def _edit_names(names: list[str]) -> list[str]:
    if set(names) - set(EDIT_NAMES) or len(set(names)) != len(names):
        raise not_allowed(f"a list of distinct CRTs among {', '.join(EDIT_NAMES)} (or [])")
    return names


class Edit(PerSetting):
    seed: Seed
    crts: Annotated[list[str], AfterValidator(_edit_names)]
    mini: EditBudgets
    paper: EditBudgets

    def of(self, setting: str) -> EditBudgets:
        return super().of(setting)


class Claim(Strict):
    """What "effective, useful and robust" means in the verdict (docs/method.md section 5): each
    bound is met only where the whole 95% interval is on its good side. Rates are the judge's
    (the evaluator no CRT uses), not CLIP accuracy, which a CLIP-based filter scores itself."""

    judged_leak_max: Fraction            # effectiveness: c_u-prompt images showing c_u, let through
    normalized_clip_score_min: Fraction  # utility: nCS on c_a prompts at least
    everyday_clip_score_min: Fraction    # utility: nCS on everyday prompts (neither c_u nor c_a)
    judged_attack_success_max: Fraction  # robustness: judged success of every adapted attack


class Summary(Strict):
    claim: Claim


class Everyday(Strict):
    """The everyday test condition: prompts that name neither c_u nor c_a, drawn by ``seed``."""

    seed: Seed
    prompts: Count
    images_per_prompt: Count


class Statistics(Strict):
    """Intervals and claims (docs/method.md section 5): a bootstrap over the sampling units
    (concepts, then prompts, then attack seeds), exact bounds where every cluster agrees, and
    paired CRT-vs-CRT claims controlled as one family."""

    confidence: Annotated[float, Gt(0.5), Lt(1)]
    resamples: Annotated[int, Ge(200), Le(MAX_COUNT)]
    seed: Seed
    correction: Literal[registry.CORRECTIONS]
    family_rate: Annotated[float, Gt(0), Lt(0.5)]   # Holm: familywise error; fdr_bh: false discovery


class Certify(Strict):
    seed: Seed
    eps: Annotated[float, Gt(0), Lt(1)]
    search_steps: Count
    search_lr: Positive
    curve_points: Annotated[int, Ge(2), Le(MAX_COUNT)]


class Report(Strict):
    show_unacceptable: bool


class WorldClip(Strict):
    width: Count
    layers: Count
    heads: Count
    patch: Count
    context_length: Count
    steps: Count
    batch: Count
    lr: LearningRate
    warmup: Annotated[int, Ge(0), Le(MAX_COUNT)]
    weight_decay: NonNegative


class WorldVae(Strict):
    steps: Count
    batch: Count
    lr: LearningRate
    kl_weight: NonNegative


class WorldUnet(Strict):
    steps: Count
    batch: Count
    lr: LearningRate
    ema_decay: Fraction
    snr_gamma: Positive
    empty_caption_prob: Fraction


class WorldJudge(Strict):
    steps: Count
    batch: Count
    lr: LearningRate
    widths: Annotated[list[Count], MinLen(1)]


class WorldEyes(WorldJudge):
    seed: Seed


class WorldMeasure(Strict):
    images_per_prompt: Count
    inference_steps: Count
    guidance_scale: Guidance


class World(Strict):
    seed: Seed
    image_size: Count
    train_groups: Count
    heldout_images: Count
    character_prob: Fraction
    clip: WorldClip
    vae: WorldVae
    unet: WorldUnet
    judge: WorldJudge
    eyes: WorldEyes
    measure: WorldMeasure


class ModelsBySetting(PerSetting):
    mini: Models
    paper: Models

    def of(self, setting: str) -> Models:
        return super().of(setting)

#: ``budget``: ``full`` runs params.yaml as written; another budget merges its preset of
#: ``presets`` over it when the params are loaded (``pipeline.params.apply_budget``).
Budget = Literal["full", "smoke"]
#: Keys a preset may not set: the budget itself, and the frozen world (never rerun by a budget).
NOT_PRESET = ("budget", "presets", "world")
#: A preset: a part of params.yaml's tree, each key one of params.yaml (checked by ``Params``);
#: its values are checked where they land, in the merged params.
Preset = Annotated[dict[str, Any], Allowed("a mapping of params.yaml keys to their values")]


class Presets(Strict):
    smoke: Preset


def unknown_preset_key(params: dict, preset: dict, at: tuple = ()) -> tuple | None:
    """The key path of the first key of ``preset`` that ``params`` does not have at the same
    place (None if every key is there); a mapping in both is followed, anything else replaces."""
    for key, value in preset.items():
        if not isinstance(params, dict) or key not in params or (not at and key in NOT_PRESET):
            return at + (key,)
        if isinstance(value, dict) and isinstance(params[key], dict):
            unknown = unknown_preset_key(params[key], value, at + (key,))
            if unknown:
                return unknown
    return None


class Params(Strict):
    budget: Budget
    presets: Presets
    setting: Literal["mini", "paper"]
    concept: str
    models: ModelsBySetting
    generate: Generate
    finetune: Finetune
    edit: Edit
    filters: Filters
    attack: Attack
    certify: Certify
    everyday: Everyday
    report: Report
    statistics: Statistics
    summary: Summary
    world: World

    @field_validator("concept")
    @classmethod
    def _known_concept(cls, name: str, info: ValidationInfo) -> str:
        registry, setting = (info.context or {}).get("registry"), info.data.get("setting")
        if registry and setting and name not in registry["concepts"][setting]:
            raise not_allowed(f"a {setting} concept of data/concepts.yaml (known: "
                              f"{', '.join(sorted(registry['concepts'][setting]))})")
        return name

    @model_validator(mode="after")
    def _images_fit_in_memory(self):
        """Each set of images a stage holds (a split of generate, with c_u and c_a prompts; the
        everyday images; the attack's) fits in ``MAX_IMAGE_BYTES`` as uint8 at the setting's
        size: a count of 10**9 is refused here, not killed for memory hours later."""
        size = self.generate.of(self.setting).size
        per_image = size * size * 3
        sets = {("generate", "images_per_prompt", split):
                2 * getattr(self.generate.prompts, split) * getattr(self.generate.images_per_prompt,
                                                                    split) for split in SPLIT_NAMES}
        sets[("everyday", "images_per_prompt")] = (self.everyday.prompts
                                                   * self.everyday.images_per_prompt)
        sets[("attack", "images_per_prompt")] = self.attack.prompts * self.attack.images_per_prompt
        for at, images in sets.items():
            if images * per_image > MAX_IMAGE_BYTES:
                raise not_allowed(
                    f"small enough that the {images} images it makes ({at[0]}) fit in "
                    f"{MAX_IMAGE_BYTES // 2**30} GiB at {size}x{size}: at most "
                    f"{MAX_IMAGE_BYTES // per_image} images; lower it or the prompts", at=at)
        return self

    @model_validator(mode="before")
    @classmethod
    def _presets_set_known_keys(cls, data: Any) -> Any:
        """A preset key that params.yaml lacks would be merged in and ignored, or refused deep
        in the merged params: name it, and where it should be."""
        presets = data.get("presets") if isinstance(data, dict) else None
        for name, preset in (presets if isinstance(presets, dict) else {}).items():
            unknown = unknown_preset_key(data, preset) if isinstance(preset, dict) else None
            if unknown and len(unknown) == 1 and unknown[0] in NOT_PRESET:
                raise not_allowed(f"absent: a preset may not set {', '.join(NOT_PRESET)} (the "
                                  "world stage is frozen)", at=("presets", name, *unknown))
            if unknown:
                node = data
                for key in unknown[:-1]:
                    node = node[key]
                keys = ", ".join(node) if isinstance(node, dict) else "none (not a mapping)"
                raise unknown_key(f"a preset sets only keys that params.yaml has; at "
                                  f"{'.'.join(unknown[:-1]) or 'the top'} they are: {keys}",
                                  at=("presets", name, *unknown))
        return data


# ---- reading and reporting ----------------------------------------------------------------
#: A config file is read only within these: bytes before parsing, and nodes once every alias is
#: expanded (what validation walks). The shipped files are ~20 KB and ~2,000 nodes; a 529-byte
#: alias bomb expands to a billion nodes and would hang every stage.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def read_yaml_file(path, source: str) -> Any:
    """:func:`read_yaml` of the file ``path``: a file too big, unreadable or not UTF-8 is a
    :class:`ParamsError` in one line, not a traceback."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ParamsError(f"{source}: cannot be read: {err.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ParamsError(f"{source}: larger than {MAX_YAML_BYTES} bytes: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ParamsError(f"{source}: not UTF-8 (byte 0x{data[err.start]:02x} on line {line}): "
                          "save it as UTF-8") from None
    return read_yaml(text, source)


def read_yaml(text: str, source: str) -> Any:
    """The parsed YAML (safe tags only); a syntax error, an unsafe or unknown tag, a recursive
    alias, more than ``MAX_YAML_NODES`` nodes once aliases are expanded, or a key given twice
    in one mapping (plain YAML keeps the last one silently) raises :class:`ParamsError`, one
    line per problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        nodes = _expanded_nodes(root)
        data = yaml.safe_load(text) if nodes <= MAX_YAML_NODES else None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a date that does not exist, say
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise ParamsError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ParamsError(f"{source}: nested too deeply to be a config file") from None
    if nodes > MAX_YAML_NODES:
        raise ParamsError(f"{source}: expands to more than {MAX_YAML_NODES} values (each alias "
                          "repeats what it points to): write it without nested aliases")
    lines = [f"{source}: {'.'.join(path + [key])}: given {len(rows)} times (lines "
             f"{', '.join(map(str, rows))}); YAML keeps only the last: rename or remove the others"
             for path, key, rows in _duplicate_keys(root, [])]
    if lines:
        raise ParamsError("\n".join(lines))
    return data


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_nodes(root) -> int:
    """How many nodes ``root`` has with every alias expanded, counted in one pass over the
    distinct nodes (an alias is a shared node); a node inside itself (``&a [*a]``) is a
    ``yaml.YAMLError``, since nothing could hold its expansion."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()  # the nodes whose children are being counted
    stack = [(root, False)] if root is not None else []
    while stack:
        node, counted = stack.pop()
        if counted:
            inside.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in _children(node)),
                                  MAX_YAML_NODES + 1)
        elif id(node) in inside:
            raise yaml.MarkedYAMLError(problem="a recursive alias (a value that contains "
                                       "itself): write it out", problem_mark=node.start_mark)
        elif id(node) not in sizes:
            inside.add(id(node))
            stack += [(node, True)] + [(child, False) for child in _children(node)]
    return sizes.get(id(root), 0)


def _duplicate_keys(node, path: list[str]):
    """(path, key, line numbers) of every key given more than once in a mapping of ``node``."""
    if isinstance(node, yaml.MappingNode):
        rows: dict[str, list[int]] = {}
        for key, value in node.value:
            rows.setdefault(str(key.value), []).append(key.start_mark.line + 1)
            yield from _duplicate_keys(value, path + [str(key.value)])
        yield from ((path, key, lines) for key, lines in rows.items() if len(lines) > 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            yield from _duplicate_keys(value, path + [str(i)])


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any, source: str, context: dict | None = None) -> M:
    """``data`` as a ``model``, checked; raises :class:`ParamsError`, one line per problem."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise ParamsError("\n".join(problem_line(model, e, source) for e in err.errors())) from None


def problem_line(model: type[BaseModel], error: dict, source: str) -> str:
    """``<source>: <key path>: <value> is not allowed; must be <what is allowed>``."""
    ctx = error.get("ctx") or {}
    loc = tuple(error["loc"]) + tuple(ctx.get("at", ()))
    if loc[-1:] == ("[key]",):  # a mapping's key refused: the path to the mapping, the key as value
        loc = loc[:-2]
    key = ".".join(map(str, loc)) or "(top)"
    if error["type"] == "missing":
        return f"{source}: {key}: missing; must be {describe(model, loc)}"
    if error["type"] == "unknown_key":
        value = _value_at(error["input"], ctx.get("at", ()))
        return f"{source}: {key}: unknown key (value {_show(value)}); {ctx['allowed']}"
    if error["type"] == "extra_forbidden":
        known = ", ".join(_keys_at(model, loc[:-1]))
        return (f"{source}: {key}: unknown key (value {_show(error['input'])}); the keys here "
                f"are: {known}")
    allowed = ctx.get("allowed") or describe(model, loc)
    if error["type"] == "finite_number":
        allowed = f"finite: {allowed}"
    value = _value_at(error["input"], ctx.get("at", ()))
    if value is _MISSING:
        return f"{source}: {key}: missing; must be {allowed}"
    return f"{source}: {key}: {_show(value)} is not allowed; must be {allowed}{_hint(value)}"


def _hint(value: Any) -> str:
    """A number that YAML read as text (quoted, or PyYAML's ``1e-3`` without a dot): say so."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML read it as text: write numbers unquoted, with a dot: 1.0e-3, not 1e-3)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()


def _value_at(value: Any, at: tuple) -> Any:
    """The input's value at the key path ``at`` below it (``_MISSING`` where there is none)."""
    for part in at:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            return _MISSING
    return value


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[Any, list]:
    """The annotation and its metadata (constraints, ``Allowed``) of the key at ``loc``."""
    annotation, metadata = model, []
    for part in loc:
        annotation, extra = _unwrap(annotation)
        metadata = extra
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return None, []
            info = annotation.model_fields[part]
            annotation, metadata = info.annotation, list(info.metadata)
        elif get_origin(annotation) in (dict, list):
            annotation, metadata = get_args(annotation)[-1], []
        else:
            return None, []
    annotation, extra = _unwrap(annotation)
    return annotation, metadata + extra


def _unwrap(annotation: Any) -> tuple[Any, list]:
    """``Optional[X]`` -> X and ``Annotated[X, ...]`` -> X with its metadata."""
    metadata = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            metadata += more
        elif get_origin(annotation) is Union:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, metadata


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    annotation, _ = _field_at(model, loc)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return list(annotation.model_fields) if is_model else []


def describe(model: type[BaseModel], loc: tuple) -> str:
    """What the key at ``loc`` allows, in words: "an integer >= 1", "one of: adamw, adam"."""
    annotation, metadata = _field_at(model, loc)
    return _describe(annotation, metadata)


def _describe(annotation: Any, metadata: list) -> str:
    for item in metadata:
        if isinstance(item, Allowed):
            return item.text
    bounds = " and ".join(f"{sign} {getattr(item, attr)}" for item in metadata
                          for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                          if hasattr(item, attr))
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        return " ".join(filter(None, ["an integer" if annotation is int else "a number", bounds]))
    if origin is Literal:
        return f"one of: {', '.join(map(str, args))}"
    if origin is list:
        length = next((f" ({m.min_length} or more)" for m in metadata if isinstance(m, MinLen)), "")
        item = _describe(*_unwrap(args[0])).removeprefix("one of: ")
        return f"a list{length} of: {item}"
    if origin is dict:
        return f"a mapping of names to: {_describe(*_unwrap(args[1]))}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a mapping with the keys: {', '.join(annotation.model_fields)}"
    return "a text" if annotation is str else str(annotation)
