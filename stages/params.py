"""The typed schema of params.yaml, validated once at the edge.

Every stage and flow calls :func:`load_params` before doing any work. A wrong key, a wrong type,
a negative size or a mixture that does not sum to 1 raises :class:`ParamsError` whose message
names the key (``corpus.synthetic.n_caption``) and the allowed values or keys. Inside the
pipeline the typed objects are trusted.

Run ``python -m stages.params [params.yaml]`` to check a file without running anything.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

KINDS: tuple[str, ...] = ("caption", "interleaved", "text")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange", "gray", "pink")
SIZES = ("small", "large")

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticCorpus(Strict):
    """The seeded generator of rendered scenes (stages/synthetic.py)."""

    n_caption: NonNegInt = 20000
    n_interleaved: NonNegInt = 5000
    n_text: NonNegInt = 10000
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    grid: Annotated[int, Field(ge=2, le=8)] = 3
    max_objects: PosInt = 4
    shapes: list[Literal[SHAPES]] = Field(default_factory=lambda: list(SHAPES[:4]), min_length=1)
    colors: list[Literal[COLORS]] = Field(default_factory=lambda: list(COLORS[:8]), min_length=2)
    sizes: list[Literal[SIZES]] = Field(default_factory=lambda: list(SIZES), min_length=1)
    story_images: Annotated[int, Field(ge=2, le=16)] = 3
    max_changes: PosInt = 3
    jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.12
    noise: Annotated[float, Field(ge=0.0, le=64.0)] = 6.0

    @model_validator(mode="after")
    def _fits_grid(self) -> SyntheticCorpus:
        cells = self.grid * self.grid
        if self.max_objects > cells - 1:
            raise ValueError(
                f"max_objects={self.max_objects} must leave a free cell for changes: "
                f"allowed 1..{cells - 1} for grid={self.grid}"
            )
        for name in ("shapes", "colors", "sizes"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        return self


class FilesCorpus(Strict):
    """Real data in the formats public data comes in; each a list of paths or globs."""

    caption: list[str] = Field(default_factory=list)  # img2dataset webdataset tars
    interleaved: list[str] = Field(default_factory=list)  # OBELICS-style parquet
    text: list[str] = Field(default_factory=list)  # DCLM-style jsonl / parquet
    max_bad_fraction: Fraction = 0.05
    max_image_side: PosInt = 4096
    min_image_side: PosInt = 8


class CorpusParams(Strict):
    source: Literal["synthetic", "files"] = "synthetic"
    samples_per_file: PosInt = 5000
    synthetic: SyntheticCorpus = Field(default_factory=SyntheticCorpus)
    files: FilesCorpus = Field(default_factory=FilesCorpus)

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
    source: Literal["train", "file"] = "train"
    path: str | None = None  # a user's tokenizer.json when source == "file"
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = 1024
    min_frequency: PosInt = 2

    @model_validator(mode="after")
    def _path_given(self) -> TokenizerParams:
        if self.source == "file" and not self.path:
            raise ValueError("source is 'file' but tokenizer.path is empty")
        return self


class ShardsParams(Strict):
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    patch_size: PosInt = 8
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    samples_per_shard: PosInt = 2000

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
        return (self.image_size // self.patch_size) ** 2


class CodebookParams(Strict):
    """The discrete visual tokenizer: k-means codes over image patches (stages/codebook.py)."""

    n_codes: Annotated[int, Field(ge=2, le=65536)] = 256  # K (not "size": DVC ignores that name)
    samples: PosInt = 50000  # training patches sampled for k-means
    iters: PosInt = 50
    seed: NonNegInt = 0


class Mixture(Strict):
    """Sampling probability of each data kind (paper default 45-45-10)."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    caption: Fraction = 0.45
    interleaved: Fraction = 0.45
    text: Fraction = 0.10

    @model_validator(mode="after")
    def _sums_to_one(self) -> Mixture:
        total = self.caption + self.interleaved + self.text
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"must sum to 1 (got {total:g}); its keys are {', '.join(KINDS)}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}


class DataParams(Strict):
    context_length: PosInt = 256
    mixture: Mixture = Field(default_factory=Mixture)


# Grid architecture names -> (arch, moe, modality_aware); flows/train.py maps them to configs.
ARCHS = ("early", "late", "discrete", "early-moe", "early-moe-aware", "late-moe", "discrete-moe")
LADDER = ("xxs", "xs", "s", "m", "l", "xl", "xxl")  # model.config.SIZES


class ModelParams(Strict):
    """Settings every grid point shares (sizes come from the ladder in model/config.py)."""

    n_experts: Annotated[int, Field(ge=2)] = 8  # paper: 8 experts, top-1
    top_k: PosInt = 1
    aux_loss_weight: Annotated[float, Field(ge=0.0)] = 0.01
    z_loss_weight: Annotated[float, Field(ge=0.0)] = 0.0
    enc_lr_mult: Annotated[float, Field(gt=0.0)] = 0.1  # late fusion encoder lr multiple

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

    study: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "default"
    archs: list[Literal[ARCHS]] = Field(default_factory=lambda: ["early"], min_length=1)
    sizes: list[Literal[LADDER]] = Field(default_factory=lambda: ["xxs"], min_length=1)
    tokens: list[PosInt] = Field(default_factory=lambda: [100_000], min_length=1)
    mixtures: dict[str, Mixture] = Field(default_factory=lambda: {"45-45-10": Mixture()})
    seeds: list[NonNegInt] = Field(default_factory=lambda: [0], min_length=1)
    workers: PosInt = 2  # grid points trained at once (one process each)
    retries: NonNegInt = 1

    @model_validator(mode="after")
    def _unique(self) -> GridParams:
        for name in ("archs", "sizes", "tokens", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        if not self.mixtures:
            raise ValueError("mixtures is empty: give at least one, e.g. {'45-45-10': {...}}")
        return self


class TrainParams(Strict):
    """The recipe (paper §2.1, App. B), with lr, batch and warmup as functions of N.

    lr = lr_ref·(N/n_ref)^lr_exponent; batch rows = batch_rows_ref·(N/n_ref)^batch_exponent
    (rounded to a power of two); warmup = warmup_tokens_ref·(N/n_ref)^warmup_exponent tokens.
    """

    lr_ref: Annotated[float, Field(gt=0.0)] = 3e-3
    lr_exponent: float = -1 / 3
    n_ref: Annotated[float, Field(gt=0.0)] = 1e5
    batch_rows_ref: PosInt = 8
    batch_exponent: float = 0.25
    warmup_tokens_ref: PosInt = 16_384
    warmup_exponent: float = 0.0
    cooldown_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # 1-sqrt to 0
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4  # decoupled (scaled by lr/peak lr)
    grad_clip: Annotated[float, Field(gt=0.0)] = 1.0
    eval_every_tokens: PosInt = 50_000
    eval_batches: PosInt = 8  # validation batches per kind (fixed held-out rows)
    checkpoint_every_steps: PosInt = 50
    divergence_loss: Annotated[float, Field(gt=0.0)] = 20.0  # train loss above this = failed
    branch_cooldowns: bool = True  # one constant-lr trunk per (arch, size, mixture, seed)
    threads: PosInt = 1  # torch threads per point process on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile on GPU


_EXPONENT_STARTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.5)  # paper: 0, 0.5, 2.5
_SCALE_STARTS = tuple(2.5 * i for i in range(13))  # 0, 2.5, ..., 30; paper: 0, 5, ..., 30


class FitStarts(Strict):
    """Start values of the multi-start L-BFGS (paper App. C notation: A = e^a, B = e^b, E = e^e).

    The grid is every combination; the paper's is alpha, beta in {0, 0.5, 2.5}, a, b in
    {0, 5, ..., 30}, e in {-1, -0.5, 0.5, 1}. The default is denser (scoring a start is cheap).
    """

    alpha: list[float] = Field(default_factory=lambda: list(_EXPONENT_STARTS), min_length=1)
    beta: list[float] = Field(default_factory=lambda: list(_EXPONENT_STARTS), min_length=1)
    a: list[float] = Field(default_factory=lambda: list(_SCALE_STARTS), min_length=1)
    b: list[float] = Field(default_factory=lambda: list(_SCALE_STARTS), min_length=1)
    e: list[float] = Field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0], min_length=1)


class FitSweep(Strict):
    """The iso-FLOP sweep behind the regression exponents (stages/fit_law.py)."""

    budgets: Annotated[int, Field(ge=2)] = 20  # compute budgets C, log-spaced over the data's
    points: Annotated[int, Field(ge=3)] = 2001  # D values swept per budget


class FitMlflow(Strict):
    """Where fits are logged and registered (stages/fit_mlflow.py)."""

    experiment: str = Field(default="nmm-scaling-fits", min_length=1)
    model_prefix: str = Field(default="scaling-law-", min_length=1)  # registered: prefix + arch
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db


class FitParams(Strict):
    """Scaling-law fits L(N, D) = E + A/N^alpha + B/D^beta (stages/fit.py, paper App. C)."""

    huber_delta: Annotated[float, Field(gt=0.0)] = 1e-3
    init: FitStarts = Field(default_factory=FitStarts)
    # L-BFGS runs from the best-scored k starts of each (alpha, beta) start pair; null: all starts
    starts_per_exponent_pair: PosInt | None = 2
    bootstrap: NonNegInt = 100  # resamples (0: no intervals)
    bootstrap_starts: NonNegInt = 4  # grid starts per resample, besides the full-data optimum
    ci: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95  # interval level (percentiles)
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # top-compute runs held out
    sweep: FitSweep = Field(default_factory=FitSweep)
    on_bad_target: Literal["error", "skip"] = "error"
    mlflow: FitMlflow = Field(default_factory=FitMlflow)


class Params(Strict):
    seed: NonNegInt = 0
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    shards: ShardsParams = Field(default_factory=ShardsParams)
    codebook: CodebookParams = Field(default_factory=CodebookParams)
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    grid: GridParams = Field(default_factory=GridParams)
    train: TrainParams = Field(default_factory=TrainParams)
    fit: FitParams = Field(default_factory=FitParams)

    @model_validator(mode="after")
    def _image_fits_context(self) -> Params:
        need = self.shards.image_tokens + 3  # <boi> + patches + <eoi> + one text target
        if self.data.context_length < need:
            raise ValueError(
                f"data.context_length={self.data.context_length} cannot hold one image of "
                f"{self.shards.image_tokens} tokens: allowed >= {need}"
            )
        return self


class ParamsError(ValueError):
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
