"""The typed schema of params.yaml, validated once at the edge.

Every stage and flow calls :func:`load_params` before doing any work. A wrong key, a wrong type,
a negative size, a missing key or a mixture that does not sum to 1 raises :class:`ParamsError`
whose message names the key (``corpus.synthetic.n_caption``) and the allowed values or keys.
Inside the pipeline the typed objects are trusted.

**One place for every value**: the schema has no defaults of its own. params.yaml lists every
key (the repository's copy, :data:`REPO_PARAMS`, is the reference study and the template for a
new one); a missing key is an error naming it. Code that needs a study without a file (tests,
benchmarks, the fit CLI on a foreign table) starts from the repository's params.yaml and
overrides sections (:func:`study_params`). The allowed architectures and sizes come from their
registries in model/ (model/archs.py, model/sizes.py), the data kinds from stages/data/kinds.py,
the law families from stages/scaling/families.py.

Run ``python -m stages.params [params.yaml]`` to check a file without running anything.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.archs import VARIANTS
from model.config import image_tokens
from model.sizes import SIZES, check_size
from stages.common.inputs import InputError
from stages.common.paths import ROOT
from stages.data.kinds import KINDS
from stages.scaling.families import FAMILIES

REPO_PARAMS = ROOT / "params.yaml"
ARCHS = tuple(VARIANTS)
SIZE_NAMES = tuple(SIZES)

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticCorpus(Strict):
    """The seeded long-tail world (stages/data/world.py) and its documents
    (stages/data/synthetic.py)."""

    n_caption: NonNegInt  # documents per kind
    n_interleaved: NonNegInt
    n_text: NonNegInt
    entity_bits: Annotated[int, Field(ge=1, le=22)]  # 2^entity_bits entities
    zipf_a: Annotated[float, Field(gt=0.0, le=5.0)]  # p(rank r) ∝ r^-zipf_a
    classes: Annotated[int, Field(ge=1, le=10)]  # coarse visual classes (colours)
    syllable_bits: Annotated[int, Field(ge=1, le=6)]  # 2^syllable_bits name syllables
    attributes: Annotated[int, Field(ge=1, le=32)]  # facts per entity
    values: Annotated[int, Field(ge=2, le=512)]  # values per attribute
    max_entities: Annotated[int, Field(ge=1, le=4)]  # entities per image (2 x 2 cells)
    visual_bits: Annotated[int, Field(ge=0, le=16)]  # identity bits an image shows
    caption_facts: NonNegInt  # facts per caption
    story_images: Annotated[int, Field(ge=2, le=16)]  # images per interleaved document
    story_facts: NonNegInt  # facts after each image of a story
    text_facts: PosInt  # facts per text document
    image_size: Annotated[int, Field(ge=16, le=1024, multiple_of=16)]  # rendered (px)
    noise: Annotated[float, Field(ge=0.0, le=64.0)]  # pixel noise (std, 0-255 scale)

    @model_validator(mode="after")
    def _visible(self) -> SyntheticCorpus:
        if self.visual_bits > self.entity_bits:
            raise ValueError(
                f"visual_bits={self.visual_bits} cannot exceed entity_bits={self.entity_bits}: "
                f"allowed 0..{min(self.entity_bits, 16)}"
            )
        return self


class FilesCorpus(Strict):
    """Real data in the formats public data comes in; each a list of paths or globs."""

    caption: list[str]  # img2dataset webdataset tars
    interleaved: list[str]  # OBELICS-style parquet
    text: list[str]  # DCLM-style jsonl / parquet
    max_bad_fraction: Fraction
    max_image_side: PosInt
    min_image_side: PosInt


class CorpusParams(Strict):
    source: Literal["synthetic", "files"]
    samples_per_file: PosInt  # per file of a generated corpus (real data is never copied)
    synthetic: SyntheticCorpus
    files: FilesCorpus

    @model_validator(mode="after")
    def _files_given(self) -> CorpusParams:
        if self.source == "files" and not (
            self.files.caption or self.files.interleaved or self.files.text
        ):
            raise ValueError(
                "source is 'files' but corpus.files.caption, .interleaved and .text are all empty"
            )
        return self


class TokenizerParams(Strict):
    source: Literal["train", "file"]
    path: str | None  # a user's tokenizer.json when source == "file"
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)]
    min_frequency: PosInt
    max_files: PosInt | None  # corpus files per kind it trains on (a seeded sample); null: all
    seed: NonNegInt  # the sample's

    @model_validator(mode="after")
    def _path_given(self) -> TokenizerParams:
        if self.source == "file" and not self.path:
            raise ValueError("source is 'file' but tokenizer.path is empty")
        return self


class ShardsParams(Strict):
    image_size: Annotated[int, Field(ge=8, le=1024)]
    patch_size: PosInt
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    samples_per_shard: PosInt
    # encoded: each image's source bytes where its size is already image_size square, else
    # re-encoded as `encode`; raw: uint8 pixels (.npy, ~10x the bytes of the source's JPEGs)
    images: Literal["encoded", "raw"]
    encode: Literal["png", "jpeg", "webp"]  # png: lossless
    quality: Annotated[int, Field(ge=1, le=100)]  # jpeg / webp
    # null: the shards in data/shards; a URL (s3://bucket/prefix): written there, and
    # data/shards keeps their manifest (what DVC versions) and info
    url: str | None

    @model_validator(mode="after")
    def _patches_tile(self) -> ShardsParams:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        return self

    @property
    def image_tokens(self) -> int:
        """Decoder positions per image: one per patch (paper: 224 px / 14 px -> 256)."""
        return image_tokens(self.image_size, self.patch_size)


class CodebookParams(Strict):
    """The discrete visual tokenizer: k-means codes over image patches (stages/data/codebook.py)."""

    n_codes: Annotated[int, Field(ge=2, le=65536)]  # K (not "size": DVC ignores that name)
    samples: PosInt  # training patches sampled for k-means
    max_shards: PosInt | None  # train shards read for them (a seeded sample); null: all
    iters: PosInt
    seed: NonNegInt


class Mixture(Strict):
    """Sampling probability of each data kind (paper: 45-45-10); a kind left out is not sampled
    (0), and the kinds must sum to 1."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    caption: Fraction = 0.0
    interleaved: Fraction = 0.0
    text: Fraction = 0.0

    @model_validator(mode="after")
    def _sums_to_one(self) -> Mixture:
        total = self.caption + self.interleaved + self.text
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"must sum to 1 (got {total:g}); its keys are {', '.join(KINDS)}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


class DataParams(Strict):
    """How training rows are built (the mixtures a point trains on are ``grid.mixtures``)."""

    context_length: PosInt  # tokens per packed row
    # where the data stages' per-file tasks run (stages/common/engine.py): local processes, or
    # a Ray cluster at `address` (host:port of its head, or auto)
    engine: Literal["local", "ray"]
    address: str | None


class ModelParams(Strict):
    """Settings every grid point shares (sizes come from the ladder in model/sizes.py)."""

    n_experts: Annotated[int, Field(ge=2)]  # paper: 8 experts, top-1
    top_k: PosInt
    aux_loss_weight: Annotated[float, Field(ge=0.0)]
    z_loss_weight: Annotated[float, Field(ge=0.0)]
    enc_lr_mult: Annotated[float, Field(gt=0.0)]  # late fusion encoder lr multiple
    # N counts the token embedding and output head too (the paper's Table 6); false: N is the
    # non-embedding count (Kaplan et al.)
    count_embeddings: bool

    @model_validator(mode="after")
    def _top_k(self) -> ModelParams:
        if self.top_k > self.n_experts // 2:
            raise ValueError(
                f"top_k={self.top_k} must be <= n_experts // 2 = {self.n_experts // 2} "
                "(modality-aware MoE splits the experts in two)"
            )
        return self


class GridParams(Strict):
    """The study: architectures x sizes x token budgets x mixtures x seeds."""

    study: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    archs: list[Literal[ARCHS]] = Field(min_length=1)
    # a named size of model/sizes.py (the laptop ladder, the paper's Table 6) or wWIDTHdDEPTH
    sizes: list[Annotated[str, AfterValidator(check_size)]] = Field(min_length=1)
    tokens: list[PosInt] = Field(min_length=1)
    mixtures: dict[str, Mixture]
    seeds: list[NonNegInt] = Field(min_length=1)
    # MoE archs: one point per expert count (None: model.n_experts only); the sparsity-aware
    # law (stages/scaling/sparsity.py) is fitted when there are several
    experts: list[Annotated[int, Field(ge=2)]] | None = Field(min_length=1)
    workers: PosInt  # grid points trained at once (one process each)
    retries: NonNegInt
    # at the end of a launch, how long to wait for an unreachable MLflow server (the points'
    # runs wait for it; training never does: flows/tracking.py)
    tracking_wait_s: Annotated[float, Field(ge=0.0)]
    # None: train here (grid.workers processes); a name: each chain is a flow run on that
    # Prefect work pool (flows/pool/), its workers on any machine
    work_pool: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] | None

    @model_validator(mode="after")
    def _unique(self) -> GridParams:
        for name in ("archs", "sizes", "tokens", "seeds", "experts"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        if not self.mixtures:
            raise ValueError("mixtures is empty: give at least one, e.g. {'45-45-10': {...}}")
        return self


class TrainParams(Strict):
    """The recipe (paper §2.1, App. B), with lr, batch and warmup as functions of N.

    lr = lr_ref·(N/n_ref)^lr_exponent (times lr_arch_mult of the arch); batch rows = batch_rows_ref·(N/n_ref)^batch_exponent
    (rounded to a power of two); warmup = warmup_tokens_ref·(N/n_ref)^warmup_exponent tokens
    (times moe_warmup_mult for MoE: the paper warms MoE up longer).
    """

    @model_validator(mode="after")
    def _cosine_cannot_branch(self) -> TrainParams:
        if self.schedule == "cosine" and self.branch_cooldowns:
            raise ValueError(
                "schedule is 'cosine' but branch_cooldowns is true: a cosine run decays from its "
                "first step, so budgets cannot share a constant-lr trunk; set it to false"
            )
        return self

    # law: lr = lr_ref·(N/n_ref)^lr_exponent; sizes: each size's own lr (model/sizes.py: the
    # paper's Table 6 sizes have one)
    lr_source: Literal["law", "sizes"]
    lr_ref: Annotated[float, Field(gt=0.0)]
    lr_exponent: float
    # per arch, a factor on that lr (a sweep's optimum, bench/recipe_sweep.py); archs not named: 1
    lr_arch_mult: dict[Literal[ARCHS], Annotated[float, Field(gt=0.0)]]
    n_ref: Annotated[float, Field(gt=0.0)]
    batch_rows_ref: PosInt
    batch_exponent: float
    warmup_tokens_ref: PosInt
    warmup_exponent: float
    moe_warmup_mult: Annotated[float, Field(ge=1.0)]  # MoE warms up this many times longer
    schedule: Literal["wsd", "cosine"]  # wsd: warmup, constant, 1-sqrt cooldown; cosine: to 0
    cooldown_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # 1-sqrt to 0
    adam_beta2: Annotated[float, Field(gt=0.0, lt=1.0)]  # AdamW's second-moment decay
    weight_decay: Annotated[float, Field(ge=0.0)]  # decoupled (scaled by lr/peak lr)
    grad_clip: Annotated[float, Field(gt=0.0)]
    eval_every_tokens: PosInt
    eval_batches: PosInt  # validation batches per kind (fixed held-out rows)
    log_every_steps: PosInt  # metrics.jsonl (and MLflow) every this many steps, averaged
    checkpoint_every_steps: PosInt
    # full: one file by rank 0 (gathered); sharded: torch.distributed.checkpoint, every rank its
    # shards (flows/training/checkpoints.py). Either resumes at any process count
    checkpoint_format: Literal["full", "sharded"]
    # where checkpoints go: null = the grid's results folder; or a shared folder or an fsspec
    # URL (s3://bucket/prefix; credentials and endpoint from the environment)
    checkpoint_store: str | None
    checkpoint_async: bool  # sharded: write while training goes on
    divergence_loss: Annotated[float, Field(gt=0.0)]  # train loss above this = failed
    branch_cooldowns: bool  # one constant-lr trunk per (arch, size, mixture, seed)
    threads: PosInt  # torch threads per point process on CPU
    processes: PosInt  # per point: > 1 launches it with torchrun (flows/training/dist.py)
    # none: each process holds the whole model (DDP); fsdp: parameters, gradients and optimizer
    # state sharded over the processes (FSDP2)
    sharding: Literal["none", "fsdp"]
    # rows per forward/backward pass on each process; null: its whole share of the batch. Fewer
    # rows than the share accumulate gradients over passes
    micro_batch_rows: PosInt | None
    activation_checkpointing: bool  # recompute each block's activations in the backward pass
    # sdpa: a dense mask; flex: FlexAttention's block mask (GPU only: no CPU backward in torch)
    attention: Literal["sdpa", "flex"]
    # processes per point process that read shards (local or URLs) and decode their images
    # ahead of use, loader_prefetch shards per kind each; 0: read in the training process
    loader_workers: NonNegInt
    loader_prefetch: PosInt
    device: Literal["auto", "cpu", "cuda"]
    compile: bool  # torch.compile on GPU


class PlanParams(Strict):
    """What ``python -m flows.grid plan`` sizes a study against (flows/memory.py): the memory
    one GPU offers, its peak dense bf16 FLOP/s and the model FLOP utilisation expected of it."""

    gpu_memory_gib: Annotated[float, Field(gt=0.0)]  # usable per GPU (a point must fit it)
    gpu_peak_tflops: Annotated[float, Field(gt=0.0)]  # dense bf16 peak of one GPU
    mfu: Annotated[float, Field(gt=0.0, le=1.0)]  # model FLOPs utilisation, for GPU-hours
    # the share of image tokens among a batch's tokens, to plan with before the shards exist
    # (they measure it); null: unknown (then planned as text only)
    image_share: Fraction | None


class FitStarts(Strict):
    """Start values of the multi-start L-BFGS (paper App. C notation: A = e^a, B = e^b, E = e^e).

    The grid is every combination; the paper's is alpha, beta in {0, 0.5, 2.5}, a, b in
    {0, 5, ..., 30}, e in {-1, -0.5, 0.5, 1}; params.yaml's is denser (scoring a start is cheap).
    """

    alpha: list[float] = Field(min_length=1)
    beta: list[float] = Field(min_length=1)
    a: list[float] = Field(min_length=1)
    b: list[float] = Field(min_length=1)
    e: list[float] = Field(min_length=1)


class FitSweep(Strict):
    """The iso-FLOP sweep behind the regression exponents (stages/scaling/law.py)."""

    budgets: Annotated[int, Field(ge=2)]  # compute budgets C, log-spaced over the data's
    points: Annotated[int, Field(ge=3)]  # D values swept per budget


class FitMlflow(Strict):
    """Where fits are logged and registered (stages/scaling/tracking.py)."""

    experiment: str = Field(min_length=1)
    model_prefix: str = Field(min_length=1)  # registered: prefix + arch
    tracking_uri: str | None  # null: stages/common/mlflow_store.py tracking_uri()


FAMILY_NAMES = tuple(FAMILIES)  # the law families (stages/scaling/families.py)


class FitParams(Strict):
    """Scaling-law fits, per (arch, target), of every law family in ``families`` the paper's way
    (App. C); ``law`` chooses the one reported (``auto``: by extrapolation; stages/scaling/)."""

    law: Literal["auto", *FAMILY_NAMES]
    families: list[Literal[FAMILY_NAMES]] = Field(min_length=1)
    parsimony: Annotated[
        float, Field(ge=0.0)
    ]  # auto: paired standard errors more params must win by
    huber_delta: Annotated[float, Field(gt=0.0)]
    init: FitStarts
    # L-BFGS runs from the best-scored k starts of each (alpha, beta) start pair; null: all starts
    starts_per_exponent_pair: PosInt | None
    bootstrap: NonNegInt  # resamples (0: no intervals)
    bootstrap_starts: NonNegInt  # grid starts per resample, besides the full-data optimum
    ci: Annotated[float, Field(gt=0.0, lt=1.0)]  # interval level (percentiles)
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # top-compute runs held out
    sweep: FitSweep
    on_bad_target: Literal["error", "skip"]
    mlflow: FitMlflow

    @model_validator(mode="after")
    def _law_fitted(self) -> FitParams:
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families has duplicates: {self.families}")
        if self.law != "auto" and self.law not in self.families:
            raise ValueError(
                f"law is {self.law!r} but families are {self.families}: add it, or law: auto"
            )
        return self


class Params(Strict):
    seed: NonNegInt
    corpus: CorpusParams
    tokenizer: TokenizerParams
    shards: ShardsParams
    codebook: CodebookParams
    data: DataParams
    model: ModelParams
    grid: GridParams
    train: TrainParams
    plan: PlanParams
    fit: FitParams

    @model_validator(mode="after")
    def _image_fits_context(self) -> Params:
        need = self.shards.image_tokens + 3  # <boi> + patches + <eoi> + one text target
        if self.data.context_length < need:
            raise ValueError(
                f"data.context_length={self.data.context_length} cannot hold one image of "
                f"{self.shards.image_tokens} tokens: allowed >= {need}"
            )
        return self

    @model_validator(mode="after")
    def _sizes_have_lr(self) -> Params:
        if self.train.lr_source == "sizes":
            missing = [s for s in self.grid.sizes if SIZES.get(s) is None or SIZES[s].lr is None]
            if missing:
                have = [n for n, s in SIZES.items() if s.lr is not None]
                raise ValueError(
                    f"train.lr_source is 'sizes' but grid.sizes {missing} have no lr of their "
                    f"own (sizes with one: {', '.join(have)}); use lr_source: law"
                )
        return self

    @model_validator(mode="after")
    def _experts_fit_top_k(self) -> Params:
        for n in self.grid.experts or []:
            if self.model.top_k > n // 2:
                raise ValueError(
                    f"grid.experts has {n}: with model.top_k={self.model.top_k} every count must "
                    f"be >= {2 * self.model.top_k} (modality-aware MoE splits the experts in two)"
                )
        return self


class ParamsError(InputError, ValueError):
    """params.yaml is invalid; the message lists every problem with its key."""


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc`` (to list its allowed keys)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "params"
    if err["type"] == "extra_forbidden":
        parent = _section_model(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"unknown key '{key}'; allowed keys in {where}: {allowed}"
    if err["type"] == "missing":
        return (
            f"missing key '{key}': params.yaml lists every key (copy it from the repository's "
            f"{REPO_PARAMS.name})"
        )
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def validate_params(raw: Any) -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ParamsError("invalid params:\n  - " + "\n  - ".join(lines)) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e5`` as a string; parse exponent floats as numbers, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path) -> Any:
    return yaml.load(Path(path).read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section (nested mappings merge, other
    values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def study_params(*overrides: dict[str, Any], base: str | Path = REPO_PARAMS) -> Params:
    """The study of ``base`` (the repository's params.yaml) with ``overrides`` merged in, in
    order, and validated: for tests, benchmarks and tools that need params without a file."""
    raw = read_yaml(base)
    for o in overrides:
        raw = merge(raw, o)
    return validate_params(raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path)
    except FileNotFoundError:
        raise ParamsError(f"{path} not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    try:
        return validate_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "params.yaml"
    try:
        params = load_params(path)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(yaml.safe_dump(params.model_dump(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
