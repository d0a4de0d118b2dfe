"""Tasks and dataset editions: the vocabulary every other module shares.

Predictions, targets and masks travel as dicts keyed by task name (``"va"``, ``"au"``, ``"expr"``), so adding a
task or an edition means editing this file, not every loop that touches labels.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The three ABAW tasks, in the order the paper lists its heads.
TASKS: tuple[str, ...] = ("va", "au", "expr")

#: Column names of the two valence-arousal dimensions, in file order.
VA_NAMES: tuple[str, ...] = ("valence", "arousal")

#: Sentinels for "no label" (ABAW2020.md): VA outside [-1, 1] (written as -5), AU and EXPR -1.
VA_SENTINEL: float = -5.0
LABEL_SENTINEL: int = -1

AU_NAMES_2020: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")
AU_NAMES_2021: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26",
)
EXPR_NAMES_2020: tuple[str, ...] = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")
EXPR_NAMES_2022: tuple[str, ...] = EXPR_NAMES_2020 + ("Other",)


@dataclass(frozen=True)
class Edition:
    """Where one ABAW edition keeps its annotations and what its label sets are."""

    name: str
    #: annotation folder of each task under ``<root>/annotations``
    task_dirs: dict[str, str]
    #: split folder of each split under a task folder
    split_dirs: dict[str, str]
    au_names: tuple[str, ...]
    expr_names: tuple[str, ...]

    @property
    def num_outputs(self) -> dict[str, int]:
        """Width of each task head: 2 for VA, one logit per AU, one per expression class."""
        return {"va": len(VA_NAMES), "au": len(self.au_names), "expr": len(self.expr_names)}


_SET_DIRS = {"va": "VA_Set", "au": "AU_Set", "expr": "EXPR_Set"}
_CHALLENGE_DIRS = {"va": "VA_Estimation_Challenge", "au": "AU_Detection_Challenge", "expr": "EXPR_Classification_Challenge"}

EDITIONS: dict[str, Edition] = {
    "2020": Edition("2020", _SET_DIRS, {"train": "Training_Set", "val": "Validation_Set", "test": "Test_Set"}, AU_NAMES_2020, EXPR_NAMES_2020),
    "2021": Edition("2021", _SET_DIRS, {"train": "Train_Set", "val": "Validation_Set", "test": "Test_Set"}, AU_NAMES_2021, EXPR_NAMES_2020),
    "2022": Edition("2022", _CHALLENGE_DIRS, {"train": "Train_Set", "val": "Validation_Set", "test": "Test_Set"}, AU_NAMES_2021, EXPR_NAMES_2022),
}
