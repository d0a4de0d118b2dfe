"""Every choice of a training run, typed and validated: :class:`TrainConfig` and its per-stage :class:`StageConfig`.

Values come from Python, YAML files, papermill parameters and command-line flags, so strings are read as the
field's type (``"1e-3"`` becomes a float, ``"false"`` a boolean, ``"auto"`` or ``"none"`` ``None`` where a field may
be unset, ``"va,expr"`` a list). pydantic does the conversion and the checks; this module only states the schema.

The two stages of the paper's recipe are two records of one shape (epochs, loss weighting, optimiser, learning
rate, weight decay). Flat keys such as ``stage2_lr`` (the command line's ``--stage2-lr``, the notebooks' parameter
files) are read into them, and nested ``{"stage2": {"lr": ...}}`` mappings are read too, over the stage's defaults.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtanet.errors import ConfigError
from mtanet.models import BACKBONES, POOLING_MODES
from mtanet.tasks import TASKS

__all__ = ["StageConfig", "TrainConfig", "STAGE1", "STAGE2", "flatten", "read_yaml_mapping"]

_NONE = {"none", "null", "auto", ""}


def _none_words(value: Any) -> Any:
    """``"none"``, ``"null"``, ``"auto"`` and ``""`` mean "unset" for the fields that may be unset."""
    return None if isinstance(value, str) and value.strip().lower() in _NONE else value


def _whole_number(value: Any) -> Any:
    """``"1e3"`` and ``3.0`` are whole numbers (YAML and command lines write them so); ``2.5`` is not."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.0*)?([eE]\+?\d+)?\s*", value):
        number = float(value)
        return int(number) if number.is_integer() else value
    return value


def _stationary_word(value: Any) -> Any:
    """``init_log_var``: the word ``stationary`` in any case, or a number (strings of numbers included)."""
    if isinstance(value, str) and value.strip().lower() == "stationary":
        return "stationary"
    return value


def _pretrained_spec(value: Any) -> Any:
    """``pretrained``: booleans (its older spelling) and their words read as ``"imagenet"`` or ``""``."""
    if value is None or value is False:
        return ""
    if value is True:
        return "imagenet"
    if isinstance(value, str):
        word = value.strip()
        if word.lower() in {"true", "yes", "on", "imagenet"}:
            return "imagenet"
        if word.lower() in {"false", "no", "off", "none", "null", ""}:
            return ""
        return word
    return value


def _word_list(value: Any) -> Any:
    """``"va,expr"``, ``"va expr"`` and ``"[va, expr]"`` are lists of names."""
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
    return value


Count = Annotated[int, BeforeValidator(_whole_number)]
MaybeCount = Annotated[int | None, BeforeValidator(_none_words), BeforeValidator(_whole_number)]
MaybeBool = Annotated[bool | None, BeforeValidator(_none_words)]
MaybeFloat = Annotated[float | None, BeforeValidator(_none_words)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]
Weighting = Literal["sum", "uncertainty"]
Optimizer = Literal["adam", "adamw", "sgd"]
LabelWeighting = Literal["none", "balanced", "sqrt"]


class StageConfig(BaseModel):
    """One stage of the recipe. Stage 1 defaults to the paper's plain sum with Adam, stage 2 to eq. 5 with SGD."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: Annotated[Count, Field(ge=0, description="epochs of this stage (not given by the paper); 0 skips it")]
    weighting: Weighting = Field(description="loss weighting: sum (plain sum) or uncertainty (eq. 5)")
    optimizer: Optimizer = Field(description="adam, adamw or sgd (the paper: Adam, then SGD)")
    lr: float = Field(gt=0.0, description="learning rate (the paper: 1e-3, then 1e-4)")
    weight_decay: float = Field(ge=0.0, description="weight decay (the paper: 1e-3, then 5e-3)")


#: The paper's two stages (section IV-B): the plain sum with Adam, then eq. 5's uncertainty weighting with SGD.
STAGE1 = StageConfig(epochs=10, weighting="sum", optimizer="adam", lr=1e-3, weight_decay=1e-3)
STAGE2 = StageConfig(epochs=5, weighting="uncertainty", optimizer="sgd", lr=1e-4, weight_decay=5e-3)
_STAGE_KEY = re.compile(r"(stage[12])_(\w+)")


class TrainConfig(BaseModel):
    """Every choice of a training run. ``None`` means "pick for the hardware", as each field's description says.

    Build it with keywords, :meth:`from_dict` or :meth:`from_yaml`; unknown keys raise :class:`ConfigError` with
    the closest known key, and so does any value that cannot be read as its field's type. :meth:`to_dict` gives
    plain JSON (the stages as nested mappings).

    Fields that no profile of the book sets but a user reasonably would: the augmentation strengths
    (``aug_*``: real faces are less tidy than the twin's), ``init_log_var`` (where eq. 5's log-variances start),
    ``warmup_steps`` and ``grad_clip`` (stability of a new backbone or batch size), ``eval_batch_size`` (GPU memory
    during validation).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- data
    data_root: str = Field("", description="Aff-Wild2 root, real or synthetic (`mtanet synth ROOT` writes the twin)")
    allow_cross_task_leak: bool = Field(False, description="keep training labels of videos in another task's "
                                                           "validation split")
    tasks: Annotated[list[Literal["va", "au", "expr"]], BeforeValidator(_word_list)] = Field(
        default_factory=lambda: list(TASKS), description="tasks to train (heads and losses), a subset of va, au, expr")
    image_size: Annotated[Count, Field(ge=1, description="side of the square input in pixels (the paper: 112)")] = 112
    augment: bool = Field(True, description="augment training images (flip, crop, brightness/contrast); never "
                                            "validation")
    aug_flip: Share = Field(0.5, description="probability of a horizontal flip")
    aug_crop_scale: float = Field(0.8, gt=0.0, le=1.0, description="smallest area share of the random square crop "
                                                                   "(1: no crop); its position is random, so it also "
                                                                   "translates")
    aug_brightness: float = Field(0.2, ge=0.0, lt=1.0, description="brightness factor drawn from [1 - b, 1 + b]")
    aug_contrast: float = Field(0.2, ge=0.0, lt=1.0, description="contrast factor drawn from [1 - c, 1 + c]")
    cache_dir: str = Field("", description="folder for uint8 caches of the decoded images (faster epochs); empty: "
                                           "decode jpgs")
    # --- model
    backbone: str = Field("senet50", description="a key of mtanet.models.BACKBONES (senet50 is the paper's)")
    pretrained: Annotated[str, BeforeValidator(_pretrained_spec)] = Field(
        "", description="backbone initialisation: empty (random), imagenet (timm's ImageNet weights from the local "
                        "cache, nothing is downloaded; true means the same) or the path of converted VGGFace2 "
                        "SE-ResNet-50 weights (torch.save(mtanet.models.convert_senet50_ft(PICKLE), PATH); needs "
                        "backbone senet50), loaded before stage 1 and recorded in metrics.json with its SHA-256")
    vggface2_weights: str = Field("", description="path of the VGGFace2 senet50_ft pickle (the paper's "
                                                  "initialisation); needs backbone senet50")
    pooling: str = Field("avgmax_concat", description="neck variant, see mtanet.models.PoolingNeck")
    feature_dim: Annotated[Count, Field(ge=1, description="width of the shared feature (the paper: 1024)")] = 1024
    dropout: Share = Field(0.5, description="dropout probability in the neck")
    # --- optimisation
    batch_size: Annotated[Count, Field(ge=1, description="global batch size (split evenly across DDP ranks); not "
                                                         "given by the paper")] = 64
    steps_per_epoch: Annotated[MaybeCount, Field(description="batches per epoch; None: enough to cover the "
                                                             "largest task pool once")] = None
    stage1: StageConfig = Field(STAGE1, description="stage 1: the plain sum, Adam, lr 1e-3, weight decay 1e-3")
    stage2: StageConfig = Field(STAGE2, description="stage 2: eq. 5, SGD, lr 1e-4, weight decay 5e-3")
    momentum: float = Field(0.9, ge=0.0, description="SGD momentum (not given by the paper)")
    lr_log_vars: MaybeFloat = Field(None, description="learning rate of the uncertainty log-variances; None: the "
                                                      "stage's rate")
    init_log_var: Annotated[float | Literal["stationary"], BeforeValidator(_stationary_word)] = Field(
        "stationary", description="where eq. 5's s = log sigma^2 starts: stationary (at the start of stage 2, each "
                                  "task's s* = log(2 c L) for its mean training loss L over the last stage-1 epoch, "
                                  "so that stage 2 starts at eq. 5's optimum for the losses it inherits; 0 when no "
                                  "stage-1 epoch with the plain sum came before) or a number for every task (0: "
                                  "the weights 0.5, 1, 1)")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="constant (the paper names no "
                                                                               "schedule) or cosine, per stage")
    warmup_steps: Annotated[Count, Field(ge=0, description="linear warm-up steps at the start of each stage")] = 0
    grad_clip: float = Field(0.0, ge=0.0, description="clip the gradient norm to this value; 0: no clipping")
    expr_class_weight: LabelWeighting = Field("none", description="expression cross-entropy class weights from the "
                                                                  "training labels: none (the paper's eq. 1), "
                                                                  "balanced (n / (C n_c)) or sqrt (its square root)")
    au_pos_weight: LabelWeighting = Field("none", description="AU BCE weight of positives from the training labels: "
                                                              "none (the paper's eq. 2), balanced (negatives / "
                                                              "positives per AU) or sqrt (its square root)")
    # --- run
    seed: Count = Field(0, description="seed of initialisation, batches, augmentation and dropout")
    device: str = Field("auto", description="cpu, cuda, cuda:N, mps or auto (cuda if available); a missing device "
                                            "is an error")
    threads: Annotated[MaybeCount, Field(description="torch CPU threads; None: the cores this process may use, "
                                                     "shared by the ranks of this machine")] = None
    num_workers: Annotated[MaybeCount, Field(description="data loader processes; None: min(8, cores) on CUDA, 0 on "
                                                         "CPU (measured on 2 cores: one worker was 4-7% slower "
                                                         "than none)")] = None
    amp: MaybeBool = Field(None, description="bfloat16 autocast; None: on for CUDA, off for CPU")
    device_augment: MaybeBool = Field(None, description="loader workers ship uint8 crops and the float colour "
                                                        "augmentation and scaling run on the device (a quarter of "
                                                        "the bytes, a fraction of the CPU work); None: on for CUDA, "
                                                        "off for CPU (equal to the worker path up to float "
                                                        "rounding)")
    channels_last: MaybeBool = Field(None, description="channels-last memory format; None: on for CUDA")
    compile: bool = Field(False, description="torch.compile the model")
    deterministic: MaybeBool = Field(None, description="torch.use_deterministic_algorithms; None: on for CPU, off "
                                                       "for CUDA. On CUDA also sets CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                                                       "(unless set) and cudnn.deterministic; ops without a "
                                                       "deterministic CUDA kernel warn (book/performance.md)")
    eval_batch_size: Annotated[MaybeCount, Field(description="validation batch per rank; None: twice the training "
                                                             "batch per rank")] = None
    val_every: Annotated[Count, Field(ge=0, description="validate every this many epochs, and always after the "
                                                        "last; 0: after the last epoch only")] = 1
    log_every: Annotated[Count, Field(ge=1, description="steps between step rows of log.jsonl")] = 10
    checkpoint_every: Annotated[Count, Field(ge=0, description="steps between resume checkpoints (also written at "
                                                               "every epoch end); 0: epoch ends only")] = 500
    progress: bool = Field(True, description="tqdm progress bars (terminal and notebook)")
    output_dir: str = Field("runs/mtanet", description="folder of checkpoints, log.jsonl and metrics.json")
    resume: bool = Field(False, description="continue the run in output_dir from last.pt (start it if there is none)")

    #: Fields that may differ when a run is resumed: they change how it runs, not what it computes (device and
    #: threads can change the last bits of CPU/GPU arithmetic, which is the user's call). ``data_root`` may name
    #: another path only for the same data: the trainer compares the annotations' fingerprint stored in the
    #: checkpoint (a moved or copied root resumes; other annotations are refused).
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({
        "data_root", "cache_dir", "device", "threads", "num_workers", "amp", "device_augment", "channels_last",
        "compile",
        "deterministic", "eval_batch_size", "log_every", "checkpoint_every", "progress", "output_dir", "resume"})

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_explain(err)) from None

    # ------------------------------------------------------------------------------------------------ schema rules

    @model_validator(mode="before")
    @classmethod
    def _read_stage_keys(cls, values: Any) -> Any:
        """Flat ``stage2_lr`` keys and partial ``stage2`` mappings into full stage records; unknown keys named."""
        if not isinstance(values, Mapping):
            return values
        values = dict(values)
        stages = {"stage1": STAGE1.model_dump(), "stage2": STAGE2.model_dump()}
        for name in stages:
            given = values.pop(name, None)
            if isinstance(given, StageConfig):
                given = given.model_dump()
            if given is not None:
                if not isinstance(given, Mapping):
                    raise ValueError(f"{name} must be a mapping of {list(StageConfig.model_fields)}")
                stages[name].update(given)
        for key in [k for k in values if isinstance(k, str) and _STAGE_KEY.fullmatch(k)]:
            name, field = _STAGE_KEY.fullmatch(key).groups()
            if field in StageConfig.model_fields:
                stages[name][field] = values.pop(key)
        unknown = [k for k in values if k not in cls.model_fields]
        if unknown:
            known = cls.known_keys()
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown key(s): {', '.join(hints)}; known keys: {', '.join(known)}")
        return {**values, **stages}

    @field_validator("tasks")
    @classmethod
    def _canonical_tasks(cls, tasks: list[str]) -> list[str]:
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"must be distinct names among {list(TASKS)}")
        return [t for t in TASKS if t in tasks]  # canonical order: heads and logs never depend on it

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, backbone: str) -> str:
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone; choose one of {', '.join(sorted(BACKBONES))}")
        return backbone

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, pooling: str) -> str:
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling; choose one of {', '.join(POOLING_MODES)}")
        return pooling

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", device.strip().lower()):
            raise ValueError("use cpu, cuda, cuda:N, mps or auto")
        return device

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.stage1.epochs + self.stage2.epochs == 0:
            raise ValueError("stage1.epochs and stage2.epochs are both 0: nothing to train")
        if self.vggface2_weights and self.backbone != "senet50":
            raise ValueError("vggface2_weights: the VGGFace2 SENet-50 weights need backbone senet50")
        if self.pretrained not in ("", "imagenet"):
            if self.backbone != "senet50":
                raise ValueError(f"pretrained={self.pretrained!r}: converted VGGFace2 SE-ResNet-50 weights need "
                                 f"backbone senet50, not {self.backbone}")
            if self.vggface2_weights:
                raise ValueError("pretrained and vggface2_weights both name VGGFace2 weights: give one")
        if self.batch_size < len(self.tasks):
            raise ValueError(f"batch_size {self.batch_size} is smaller than the number of tasks {len(self.tasks)} "
                             f"({', '.join(self.tasks)}): every batch holds a share of each task; use batch_size >= "
                             f"{len(self.tasks)}")
        if self.pooling == "avgmax_concat" and self.feature_dim % 2:
            raise ValueError(f"pooling avgmax_concat needs an even feature_dim, got {self.feature_dim}")
        return self

    def check_world(self, world: int) -> None:
        """Refuse, before anything runs, a global batch that ``world`` ranks (DDP processes) cannot share evenly.

        Raises:
            ConfigError: ``batch_size`` is not a multiple of ``world``, or leaves a rank fewer rows than tasks.
        """
        if world <= 1:
            return
        if self.batch_size % world:
            lower, upper = self.batch_size // world * world, -(-self.batch_size // world) * world
            choices = " or ".join(str(b) for b in dict.fromkeys((lower, upper)) if b >= max(world, len(self.tasks)))
            raise ConfigError(f"TrainConfig.batch_size={self.batch_size} does not divide evenly across the {world} "
                              f"processes (DDP ranks): every rank takes the same share of the global batch; use a "
                              f"multiple of {world} (e.g. {choices}) or another number of processes")

    # ------------------------------------------------------------------------------------------------ I/O

    @classmethod
    def known_keys(cls) -> list[str]:
        """Every key :meth:`from_dict` accepts: the fields and the flat ``stageN_<field>`` keys."""
        flat = [f"{s}_{f}" for s in ("stage1", "stage2") for f in StageConfig.model_fields]
        return [k for k in cls.model_fields] + flat

    @property
    def stages(self) -> tuple[StageConfig, StageConfig]:
        return (self.stage1, self.stage2)

    @property
    def total_epochs(self) -> int:
        return self.stage1.epochs + self.stage2.epochs

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (stages as nested mappings)."""
        return self.model_dump(mode="json")

    def to_flat_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with each stage's fields as flat ``stageN_<field>`` keys (as the command line names them)."""
        return flatten(self.to_dict())

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming the closest known key."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a TrainConfig needs a mapping of keys to values, got {type(values).__name__}")
        return cls(**{str(k): v for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a YAML mapping of fields (see :meth:`from_dict`)."""
        return cls.from_dict(read_yaml_mapping(path))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated like a new config)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with nested ``stage1``/``stage2`` records spelled as flat ``stageN_<field>`` keys."""
    out = {k: v for k, v in values.items() if k not in ("stage1", "stage2")}
    for name in ("stage1", "stage2"):
        if isinstance(values.get(name), Mapping):
            out.update({f"{name}_{k}": v for k, v in values[name].items()})
    return out


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file holding a mapping of TrainConfig keys; :class:`ConfigError` naming the file otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a TrainConfig file must hold a mapping of keys to values")
    return dict(data)


def _explain(err: ValidationError) -> str:
    """pydantic's errors as one line per problem, each naming the key as the user spells it."""
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "union", "int", "bool", "float",
                                                                   "literal", "none"))]
        key = "_".join(loc[:2]) if loc[:1] in (["stage1"], ["stage2"]) else ".".join(loc)
        message = e["msg"].removeprefix("Value error, ")
        where = f"TrainConfig.{key}" if key else "TrainConfig"
        value = f"={e['input']!r}" if key and not isinstance(e.get("input"), Mapping) else ""
        lines.append(f"{where}{value}: {message}")
    return "; ".join(dict.fromkeys(lines))
