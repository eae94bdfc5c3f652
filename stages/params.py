"""The typed schema of params.yaml, validated once at the edge.

Every stage and flow calls :func:`load_params` before doing any work. A wrong key, a wrong type,
a negative size or a mixture that does not sum to 1 raises :class:`ParamsError` whose message
names the key (``corpus.synthetic.n_caption``) and the allowed values or keys. Inside the
pipeline the typed objects are trusted.

Run ``python -m stages.params [params.yaml]`` to check a file without running anything.
"""

from __future__ import annotations

import math
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


class Params(Strict):
    seed: NonNegInt = 0
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    shards: ShardsParams = Field(default_factory=ShardsParams)
    codebook: CodebookParams = Field(default_factory=CodebookParams)
    data: DataParams = Field(default_factory=DataParams)

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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
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
