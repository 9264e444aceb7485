"""Where the finetune stage saves the fine-tuned filter, for the stages that load it: apart from
the stage module, so that a reader depends on this path and not on the training code."""
from pathlib import Path

FILTER_DIR = Path("data/finetune/filter")
