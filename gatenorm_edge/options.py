"""The names and defaults the commands offer (variants, criteria, modes, tasks): their one home, in a module
light enough for ``--help`` to import without NumPy or llama.cpp; and the one parser of comma-separated
option values."""

from .errors import GatenormError

VARIANTS = ("per-head", "full", "folded")  # Gate-Norm (scoring)
WEIGHT_CRITERIA = VARIANTS + ("ov", "qk-ov")
BASELINES = ("random", "last", "first")
DATA_DRIVEN = ("loo-ppl", "greedy-ppl", "cosine")
CRITERIA = WEIGHT_CRITERIA + BASELINES + DATA_DRIVEN
SELF = "self"  # `prune --count K`'s default choice: the self-calibrated pipeline (selfprune)

AUTO = "auto"  # the data-free default: self-calibrated, validated linear patches (selfprune)
MODES = (AUTO, "drop", "linear", "fold-vo", "window")
DEFAULT_WINDOW = 512
DEFAULT_CALIB_TOKENS = 2048  # linear: tokens cut from --calib
CALIB_SOURCES = ("mix", "bos", "starts", "chat")  # what self-sampled calibration text is sampled from
DEFAULT_FILE_TOKENS = 4096  # auto: tokens cut from --calib FILE (16 x 256, as the in-domain ceiling of docs/study.md)
DEFAULT_SELF_TOKENS = 16384  # auto, window: tokens the model samples for its own calibration (docs/study.md)
DEFAULT_CALIB_CTX = 512
DEFAULT_RIDGE = 1e-2

CACHE_TYPES = ("f16", "q8_0", "q4_0")  # llama.cpp's KV-cache types offered (-ctk/-ctv); f16 is its default
DEFAULT_CACHE_TYPE = "f16"

TASK_NAMES = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")


def comma_names(option: str, text: str, choices: tuple[str, ...]) -> list[str]:
    """'boolq, rte' -> ['boolq', 'rte'] (order kept, duplicates dropped), each checked against ``choices``."""
    names = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not names:
        raise GatenormError(f"{option}: nothing given; choose from {', '.join(choices)}")
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise GatenormError(f"{option}: unknown {unknown[0]!r}; choose from {', '.join(choices)}")
    return names


def comma_ints(option: str, text: str, example: str) -> list[int]:
    """'12,20,25' -> [12, 20, 25]; anything else is one GatenormError naming ``option`` with an ``example``."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise GatenormError(f"{option} takes comma-separated whole numbers such as {example}, not {text!r}") from None


def comma_floats(option: str, text: str, example: str) -> list[float]:
    """'1.1,1.2' -> [1.1, 1.2]; anything else is one GatenormError naming ``option`` with an ``example``."""
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise GatenormError(f"{option} takes comma-separated numbers such as {example}, not {text!r}") from None
