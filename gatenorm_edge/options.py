"""The names and defaults the commands offer (variants, criteria, modes, tasks): their one home, in a module
light enough for ``--help`` to import without NumPy or llama.cpp."""

VARIANTS = ("per-head", "full", "folded")  # Gate-Norm (scoring)
WEIGHT_CRITERIA = VARIANTS + ("ov", "qk-ov")
BASELINES = ("random", "last", "first")
DATA_DRIVEN = ("loo-ppl", "greedy-ppl", "cosine")
CRITERIA = WEIGHT_CRITERIA + BASELINES + DATA_DRIVEN
SELF = "self"  # `prune --count K`'s default choice: the self-calibrated pipeline (selfprune)

AUTO = "auto"  # the data-free default: self-calibrated, validated linear patches (selfprune)
MODES = (AUTO, "drop", "linear", "fold-vo")
DEFAULT_CALIB_TOKENS = 2048
DEFAULT_CALIB_CTX = 512
DEFAULT_RIDGE = 1e-2

TASK_NAMES = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
